"""One training step (forward, backward, AdamW) of llmbook's Transformer against transformers' Qwen3ForCausalLM:
identical dimensions, batch and precision, eager and torch.compile'd; tokens/s and MFU against this machine's
measured matmul rate in that precision (Chapter 1's measure, taken in turn with the steps). `--precision bf16`
runs both models' steps under bf16 autocast (the `cpu` preset's choice on CPUs with AMX or AVX-512 BF16) and
measures the peak with bf16 matrices.

    .venv/bin/python bench/train_step.py [--depth 4] [--vocab 8192] [--seq-len 256] [--batch 16] [--threads 2]
        [--precision fp32|bf16] [--no-compile]
"""

import argparse
import json
import statistics
import time

import torch

from llmbook.foundations import flops_per_token, matmul_benchmark, reference_model
from llmbook.modeling import ModelConfig, Transformer


def step_fn(model, hf: bool, x, compiled: bool, precision: str = "fp32"):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if compiled else model

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = forward(input_ids=x[:, :-1], labels=x[:, :-1]).loss if hf else forward(x[:, :-1], x[:, 1:])[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = ModelConfig.from_depth(args.depth, args.vocab, args.seq_len)
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1))
    step_flops = flops_per_token(config)["train"] * args.batch * args.seq_len
    variants = [("llmbook", False, False), ("transformers", True, False)]
    if not args.no_compile:
        variants += [("llmbook", False, True), ("transformers", True, True)]
    steps = {}
    for name, hf, compiled in variants:
        torch.manual_seed(0)
        model = reference_model(config) if hf else Transformer(config)
        fn = step_fn(model, hf, x, compiled, args.precision)
        fn()
        fn()  # warm-up (and compilation)
        steps[(name, compiled)] = fn
    matmul, matmul_flops = matmul_benchmark(torch.bfloat16 if args.precision == "bf16" else torch.float32)
    times = {key: [] for key in steps} | {"matmul": []}
    for _ in range(args.repeats):  # every variant and the matmul in turn, so all see the same load
        for key, fn in list(steps.items()) + [("matmul", matmul)]:
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    peak = matmul_flops / statistics.median(times.pop("matmul"))
    rows = {f"{name}{' compiled' if compiled else ''}": statistics.median(t) for (name, compiled), t in times.items()}
    print(
        f"depth {args.depth} (d={config.n_embd}), vocab {args.vocab}, {args.batch}×{args.seq_len} tokens, "
        f"{args.precision}, {args.threads} threads; matmul peak {peak / 1e9:.0f} GFLOP/s"
    )
    print(f"{'':>22} {'ms/step':>8} {'tokens/s':>9} {'MFU':>5}")
    for name, s in rows.items():
        print(f"{name:>22} {s * 1e3:8.1f} {args.batch * args.seq_len / s:9.0f} {step_flops / s / peak:5.0%}")
    ratios = {"eager": rows["transformers"] / rows["llmbook"]}
    if "llmbook compiled" in rows:
        ratios |= {
            "compiled": rows["transformers compiled"] / rows["llmbook compiled"],
            "compiled_vs_transformers_eager": rows["transformers"] / rows["llmbook compiled"],
        }
    print("llmbook / transformers tokens/s: " + ", ".join(f"{k} {v:.2f}×" for k, v in ratios.items()))
    print(
        json.dumps(
            dict(
                bench="train_step",
                depth=args.depth,
                vocab=args.vocab,
                seq_len=args.seq_len,
                batch=args.batch,
                precision=args.precision,
                peak_gflops=round(peak / 1e9, 1),
                **{f"ratio_vs_transformers_{k}": round(v, 3) for k, v in ratios.items()},
                tokens_per_s={k: round(args.batch * args.seq_len / s) for k, s in rows.items()},
                mfu={k: round(step_flops / s / peak, 3) for k, s in rows.items()},
            )
        )
    )


if __name__ == "__main__":
    main()
