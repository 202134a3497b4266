"""llama.cpp on Chapter 6's GGUF files: does llama.cpp itself read them as our model, and how fast does it run them?

For each file in a run's `model/compressed/gguf/` (F32, F16, Q8_0, Q4_0 of Chapter 5's SFT model), llama.cpp
(through llama-cpp-python) and our model holding the same values (`gguf_model`, float32 arithmetic) are compared:

- tokenization: llama.cpp's tokenizer, built from the file's tokens, merges and pre-tokenizer name, against ours on
  validation documents (the share split identically);
- greedy decoding: the same prompts (questions of Chapter 6's compression evaluation, in the chat format, so the
  SFT model answers), the same number of new tokens; the share of tokens both pick (F32 and F16 must agree on all
  of them);
- bits per byte on the same validation windows (our numbers and llama.cpp's, from its logits);
- decoding speed, one sequence: tokens/s of llama.cpp and of our float32 model, and their ratio.

llama-cpp-python is not a dependency of the book (pip builds llama.cpp from source, which takes minutes):

    .venv/bin/pip install llama-cpp-python   # 0.3.36 measured; needs a C++ compiler and CMake (about 11 minutes)
    .venv/bin/python bench/gguf.py --run-dir runs/cpu [--windows 40] [--prompts 8] [--new-tokens 32]

llama.cpp multiplies Q8_0 and Q4_0 matrices by activations it quantizes to 8 bits per value (ggml's `vec_dot_type`
of both is Q8_0), and F16 matrices by activations rounded to float16; our reference keeps activations in float32.
So on the quantized files the greedy tokens may part where two candidates are close, and bits per byte differ in the
fourth digit.

The run directory needs Chapter 6's outputs. Timings are medians of the prompts, measured one after another on an
otherwise idle machine. llama.cpp keeps its KV cache in float32 here (its default is float16), so that the F32 file
differs from our model only by the order of floating-point operations.

On CPUs with AMX (Intel Xeon Sapphire Rapids and later) llama.cpp repacks Q8_0/Q4_0 matrices for its AMX kernels,
and on this book's small matrices (128 or 384 columns at `cpu`) its first decode crashed (segmentation fault,
llama-cpp-python 0.3.36): where `llama_print_system_info` reports AMX_INT8, the bench turns that repacking off
(`use_extra_bufts = False`) and says so; `--repack` keeps it.
"""

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from llmbook.book import load_json, open_run
from llmbook.data import load_corpus
from llmbook.modeling import from_hf, generate, load_tokenizer, open_tokens, render_chat
from llmbook.post_training import evaluation_sample, instruction_entries, instruction_tasks, is_eval_task
from llmbook.specialization import GGUF_FILE_TYPES, gguf_model

GGML_TYPE_F32 = 0  # ggml's enum value, for llama.cpp's KV cache


def validation_windows(run_dir: Path, seq_len: int, count: int) -> list[list[int]]:
    "The first window of `seq_len` + 1 tokens of `count` validation documents spread evenly over the split."
    ids, index, _ = open_tokens(run_dir / "tokens", "val")
    documents = index.tolist()
    chosen = documents[:: max(1, len(documents) // count)][:count]
    return [ids[offset : offset + min(length, seq_len + 1)].tolist() for offset, length, _ in chosen if length > 1]


def question_prompts(run_dir: Path, tok, count: int) -> list[list[int]]:
    "Chat prompts (user question + assistant tag) of the run's evaluation questions, as Chapter 6 samples them."
    config = load_json(run_dir / "config.json")
    run = open_run(config["preset"], run_dir, config["overrides"], write=False)
    cfg = run.cfg
    entries = instruction_entries(load_corpus(run)["train"])
    tasks = [t for t in instruction_tasks(entries, cfg.instruction_expressions, cfg.seed) if is_eval_task(t)]
    tasks = evaluation_sample(tasks, per_kind=100, seed=cfg.seed)
    chosen = tasks[:: max(1, len(tasks) // count)][:count]
    return [render_chat(tok, [dict(role="user", content=t["question"])], add_generation_prompt=True)[0] for t in chosen]


def without_amx_repacking(llama_cpp_module) -> bool:
    "Turn off llama.cpp's weight repacking (extra buffer types) if this CPU has AMX; True if it did."
    if "AMX_INT8 = 1" not in llama_cpp_module.llama_print_system_info().decode():
        return False
    defaults = llama_cpp_module.llama_model_default_params

    def params():
        chosen = defaults()
        chosen.use_extra_bufts = False
        return chosen

    llama_cpp_module.llama_model_default_params = params
    return True


def nats_ours(model, window: list[int]) -> float:
    x = torch.tensor([window])
    with torch.no_grad():
        return F.cross_entropy(model(x[:, :-1])[0], x[0, 1:], reduction="sum").item()


def nats_llama(llm, window: list[int]) -> float:
    llm.reset()
    llm.eval(window[:-1])
    logits = torch.from_numpy(np.array(llm.scores[: len(window) - 1], dtype=np.float32))
    return F.cross_entropy(logits, torch.tensor(window[1:]), reduction="sum").item()


def greedy_llama(llm, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    "Greedy tokens after `prompt`, and the seconds the new tokens took."
    llm.reset()
    llm.eval(prompt)
    out = []
    started = time.perf_counter()
    for _ in range(new_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out, time.perf_counter() - started


def greedy_ours(model, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    x = torch.tensor([prompt])
    generate(model, x, 2)  # warm-up
    started = time.perf_counter()
    out = generate(model, x, new_tokens)[0, len(prompt) :].tolist()
    return out, time.perf_counter() - started


def main():
    import llama_cpp.llama_cpp
    from llama_cpp import Llama

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--windows", type=int, default=40, help="validation windows scored by both")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repack", action="store_true", help="keep llama.cpp's AMX repacking on CPUs with AMX")
    args = parser.parse_args()
    if not args.repack and without_amx_repacking(llama_cpp.llama_cpp):
        print("this CPU has AMX: llama.cpp's repacking of Q8_0/Q4_0 weights is off (--repack keeps it)")
    torch.set_num_threads(args.threads)
    run_dir = args.run_dir.resolve()
    tok = load_tokenizer(run_dir / "tokenizer")
    sft = from_hf(AutoModelForCausalLM.from_pretrained(run_dir / "model/sft")).eval()
    seq_len = sft.config.seq_len
    windows = validation_windows(run_dir, seq_len, args.windows)
    texts = [tok.decode(w) for w in windows]
    text_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    prompts = question_prompts(run_dir, tok, args.prompts)
    rows = {}
    for file_type in GGUF_FILE_TYPES:
        path = run_dir / f"model/compressed/gguf/sft-{file_type}.gguf"
        llm = Llama(
            model_path=str(path),
            n_ctx=seq_len,
            n_batch=seq_len,
            logits_all=True,
            n_threads=args.threads,
            type_k=GGML_TYPE_F32,
            type_v=GGML_TYPE_F32,
            verbose=False,
        )
        ours = gguf_model(sft, file_type)
        their_ids = [llm.tokenize(t.encode("utf-8", "surrogatepass"), add_bos=False, special=False) for t in texts]
        same_split = sum(a == tok.encode_ordinary(t) for a, t in zip(their_ids, texts)) / len(texts)
        bpb_ours = sum(nats_ours(ours, w) for w in windows) / math.log(2) / text_bytes
        bpb_llama = sum(nats_llama(llm, w) for w in windows) / math.log(2) / text_bytes
        agree, ours_s, llama_s = [], [], []
        for prompt in prompts:
            a, t_ours = greedy_ours(ours, prompt, args.new_tokens)
            b, t_llama = greedy_llama(llm, prompt, args.new_tokens)
            agree.append(np.mean([x == y for x, y in zip(a, b)]))
            ours_s.append(t_ours / len(a))
            llama_s.append(t_llama / len(b))
        rows[file_type] = dict(
            file_bytes=path.stat().st_size,
            same_tokenization=round(same_split, 4),
            bpb_ours=round(bpb_ours, 4),
            bpb_llama_cpp=round(bpb_llama, 4),
            greedy_tokens_agreeing=round(float(np.mean(agree)), 4),
            tokens_per_s_ours=round(1 / statistics.median(ours_s), 1),
            tokens_per_s_llama_cpp=round(1 / statistics.median(llama_s), 1),
        )
        llm.close()
    print(
        f"{len(windows)} validation windows ({text_bytes:,} bytes), {len(prompts)} questions × {args.new_tokens} "
        f"greedy tokens, {args.threads} threads"
    )
    header = ("file", "MiB", "same split", "bpb ours", "bpb llama.cpp", "greedy agree", "tok/s ours", "tok/s llama.cpp")
    print(" | ".join(header))
    for file_type, r in rows.items():
        print(
            f"{file_type} | {r['file_bytes'] / 2**20:.2f} | {r['same_tokenization']:.0%} | {r['bpb_ours']:.4f} | "
            f"{r['bpb_llama_cpp']:.4f} | {r['greedy_tokens_agreeing']:.0%} | {r['tokens_per_s_ours']:.0f} | "
            f"{r['tokens_per_s_llama_cpp']:.0f}"
        )
    ratios = {t: r["tokens_per_s_llama_cpp"] / r["tokens_per_s_ours"] for t, r in rows.items()}
    print("llama.cpp / ours tokens/s: " + ", ".join(f"{t} {v:.1f}×" for t, v in ratios.items()))
    print(json.dumps(dict(bench="gguf", rows=rows, ratio_llama_cpp_vs_ours=ratios)))
    for file_type in ("F32", "F16"):
        assert rows[file_type]["greedy_tokens_agreeing"] == 1.0, (file_type, rows[file_type])


if __name__ == "__main__":
    main()
