"""Decoding speed: Chapter 7's engine against transformers' `generate` and Chapter 3's, same model, same tokens.

For batch sizes 1 and 8 (by default), `batch` validation windows of `--prompt-tokens` tokens each (equal lengths, so
no padding anywhere) are continued greedily by `--new-tokens` tokens, end-of-turn ignored, by (the pretrained model
by default: raw text is what it continues; every model of a run has the same shape and speed):

- the engine (continuous batching over the paged KV cache, `max_running` = the batch size);
- transformers' `generate` on the same weights loaded by `AutoModelForCausalLM` (its default dynamic KV cache, SDPA);
- Chapter 3's `generate` (one contiguous KV cache for the whole batch).

It prints tokens/s (generated tokens over wall time, prefill included; the median of `--repeats` runs after one
warm-up each), the engine's ratio to each, and the share of generated tokens that equal the engine's (greedy, so
all of them unless two logits tie within rounding). The issue's goal: the engine ≥ 3× transformers at batch 1 and 8.

    .venv/bin/python bench/generate.py --run-dir runs/cpu [--model sft] [--batches 1,8] [--new-tokens 64]

Run it on an otherwise idle machine: a second busy process distorts CPU timings far more than 2×.
"""

import argparse
import copy
import statistics
import time

import torch
from transformers import AutoModelForCausalLM

from llmbook.book import load_json, open_run
from llmbook.deployment import Engine, SamplingParams
from llmbook.modeling import from_hf, generate, load_tokenizer, open_tokens


def windows(run, count: int, length: int) -> list[list[int]]:
    "The first `length` tokens of `count` validation documents at least that long, spread over the split."
    ids, index, _ = open_tokens(run.artifact("tokens"), "val")
    long_enough = [(offset, n) for offset, n, _ in index.tolist() if n >= length]
    chosen = long_enough[:: max(1, len(long_enough) // count)][:count]
    return [ids[offset : offset + length].tolist() for offset, _ in chosen]


def timed(run_once, repeats: int) -> tuple[float, list]:
    "Median seconds of `repeats` runs after a warm-up, and the last run's output."
    run_once()
    seconds, out = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        out = run_once()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--model", default="base", help="a model directory under the run's model/")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = load_json(f"{args.run_dir}/config.json")
    run = open_run(config["preset"], args.run_dir, config["overrides"], write=False)
    tokenizer = load_tokenizer(run.artifact("tokenizer"))
    hf = AutoModelForCausalLM.from_pretrained(run.artifact(f"model/{args.model}")).eval()
    ours = from_hf(hf).eval()
    no_stop = copy.deepcopy(hf.generation_config)  # like the engine's ignore_eos: end-of-turn is just a token
    no_stop.eos_token_id, no_stop.do_sample, no_stop.max_new_tokens = None, False, args.new_tokens
    batches = [int(b) for b in args.batches.split(",")]
    prompts = windows(run, max(batches), args.prompt_tokens)
    n = args.new_tokens
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    print(f"model/{args.model}: {sum(p.numel() for p in ours.parameters()):,} parameters; {args.prompt_tokens}-token")
    print(f"prompts, {n} new tokens, greedy; torch threads {torch.get_num_threads()}\n")
    header = "batch | engine tok/s | transformers tok/s | ch.3 tok/s | engine/transformers | engine/ch.3 | same tokens"
    print(header)
    print("|".join("---" for _ in header.split("|")))
    for b in batches:
        batch = prompts[:b]
        ids = torch.tensor(batch)

        def engine_run():
            return [r.output for r in Engine(ours, tokenizer, max_running=b).complete(batch, params)]

        def transformers_run():
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=no_stop)
            return out[:, ids.shape[1] :].tolist()

        def chapter3_run():
            return generate(ours, ids, n)[:, ids.shape[1] :].tolist()

        engine_s, engine_out = timed(engine_run, args.repeats)
        hf_s, hf_out = timed(transformers_run, args.repeats)
        ch3_s, ch3_out = timed(chapter3_run, args.repeats)
        tokens = b * n
        same = lambda other: sum(x == y for r, o in zip(engine_out, other) for x, y in zip(r, o)) / tokens
        print(
            f"{b} | {tokens / engine_s:.0f} | {tokens / hf_s:.0f} | {tokens / ch3_s:.0f} | {hf_s / engine_s:.2f}× | "
            f"{ch3_s / engine_s:.2f}× | {same(hf_out):.0%} / {same(ch3_out):.0%}"
        )


if __name__ == "__main__":
    main()
