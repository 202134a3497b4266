"""Tokenizer: training time of llmbook's from-scratch BPE against Hugging Face tokenizers' BpeTrainer (and
nanochat's rustbpe when it is installed), and encoding speed of ours, tiktoken and HF tokenizers, one
thread and batched, on the same text with the same merges.

    .venv/bin/python bench/tokenizer.py [--train-mb 8] [--encode-mb 6] [--vocab 8192] [--threads 2]
"""

import argparse
import os
import sys

THREADS = next((sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "--threads"), "2")
os.environ["RAYON_NUM_THREADS"] = THREADS  # HF tokenizers' and rustbpe's thread pool
os.environ["TOKENIZERS_PARALLELISM"] = "true"

import json
import statistics
import sysconfig
import time
from pathlib import Path

from llmbook import modeling as M


def stdlib_texts(skip_mb: float, mb: float) -> list[str]:
    "Standard-library source, in a fixed order: skip the first `skip_mb`, take the next `mb`."
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, seen = [], 0
    for path in sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts):
        text = path.read_text(encoding="utf-8", errors="replace")
        size = len(text.encode())
        if seen >= skip_mb * 1e6:
            texts.append(text)
        seen += size
        if seen >= (skip_mb + mb) * 1e6:
            break
    return texts


def seconds(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-mb", type=float, default=8)
    parser.add_argument("--encode-mb", type=float, default=6)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=int(THREADS))
    args = parser.parse_args()
    train, held_out = stdlib_texts(0, args.train_mb), stdlib_texts(args.train_mb, args.encode_mb)
    n_merges = args.vocab - 256 - len(M.SPECIAL_TOKENS)
    encode_mb = sum(len(t.encode()) for t in held_out) / 1e6

    training = {}
    start = time.perf_counter()
    ours = M.BPETokenizer(M.train_bpe(M.count_chunks(train), n_merges))
    training["llmbook (Python)"] = time.perf_counter() - start
    start = time.perf_counter()
    M.hf_bpe_merges(train, n_merges)
    training["HF tokenizers (Rust)"] = time.perf_counter() - start
    try:
        import rustbpe

        start = time.perf_counter()
        rustbpe.Tokenizer().train_from_iterator(iter(train), n_merges + 256)
        training["rustbpe (Rust)"] = time.perf_counter() - start
    except ImportError:
        print("rustbpe is not installed: pip install rustbpe to compare with it")

    backend, encoding = M.plain_text_backend(ours), M.to_tiktoken(ours)
    assert M.parity(ours, held_out[:200])["fraction"] == 1.0, (
        "the three implementations must agree before they are timed"
    )
    single = {
        "llmbook (Python)": lambda: [M.BPETokenizer(ours.merges).encode_ordinary(t) for t in held_out],
        "tiktoken": lambda: [encoding.encode_ordinary(t) for t in held_out],
        "HF tokenizers": lambda: [backend.encode(t, add_special_tokens=False) for t in held_out],
    }
    batched = {
        "tiktoken": lambda: encoding.encode_ordinary_batch(held_out, num_threads=args.threads),
        "HF tokenizers": lambda: backend.encode_batch(held_out, add_special_tokens=False),
    }
    speed = {f"{name}, 1 thread": encode_mb / seconds(fn, 1 if "Python" in name else 3) for name, fn in single.items()}
    speed |= {f"{name}, batched ×{args.threads}": encode_mb / seconds(fn) for name, fn in batched.items()}

    print(f"training: {args.train_mb:g} MB of standard-library source, vocabulary {args.vocab}")
    for name, s in training.items():
        print(f"  {name:<24} {s:7.2f} s   ({s / training['HF tokenizers (Rust)']:.1f}× HF)")
    print(f"encoding: {encode_mb:.1f} MB of other standard-library source, same merges (identical ids checked)")
    for name, v in speed.items():
        print(f"  {name:<28} {v:7.2f} MB/s")
    pipeline = "tiktoken"  # what Chapter 3 measured fastest and the token files are written with
    ratios = dict(
        pipeline_vs_hf_single=speed[f"{pipeline}, 1 thread"] / speed["HF tokenizers, 1 thread"],
        pipeline_vs_hf_batched=speed[f"{pipeline}, batched ×{args.threads}"]
        / speed[f"HF tokenizers, batched ×{args.threads}"],
        pipeline_vs_tiktoken=1.0,
        ours_vs_tiktoken_single=speed["llmbook (Python), 1 thread"] / speed["tiktoken, 1 thread"],
        train_ours_vs_hf=training["llmbook (Python)"] / training["HF tokenizers (Rust)"],
    )
    print(
        f"pipeline (tiktoken) vs HF tokenizers: {ratios['pipeline_vs_hf_single']:.1f}× one thread, "
        f"{ratios['pipeline_vs_hf_batched']:.1f}× batched; "
        f"the from-scratch trainer costs {ratios['train_ours_vs_hf']:.0f}× HF's"
    )
    print(
        json.dumps(
            dict(
                bench="tokenizer",
                vocab=args.vocab,
                train_mb=args.train_mb,
                encode_mb=round(encode_mb, 2),
                **{k: round(v, 3) for k, v in ratios.items()},
                train_seconds={k: round(v, 2) for k, v in training.items()},
                encode_mb_per_s={k: round(v, 2) for k, v in speed.items()},
            )
        )
    )


if __name__ == "__main__":
    main()
