"""Serving under load: `llmbook serve` and, where llama-cpp-python's server is installed, llama.cpp's server on
Chapter 6's GGUF of the same model, answering the same streamed requests from 1, 4, 16 and 64 clients.

Each server runs as its own process (as an operator would run it) on a free loopback port. Each wave sends the same
`--requests` streamed completions (text prompts of `--prompt-words` words, each answered with exactly `--new-tokens`
tokens: `ignore_eos` for ours, `min_tokens` for llama-cpp-python's), from clients that each send their next request
when the previous one ends — Chapter 7's `serving_benchmark`, the one `llmbook bench --url` runs. For each
concurrency: requests and tokens per second, TTFT and ITL p50/p99, TPOT p50, and the speed-up over one client.
The issue's goals: ≥ 4× at 16 clients, and at least llama.cpp's throughput at 16 clients.

    .venv/bin/python bench/serve.py --run-dir runs/cpu [--model sft] [--gguf F16] [--requests 64] [--new-tokens 32]

llama-cpp-python's server needs its `[server]` extras (`pip install 'llama-cpp-python[server]'` builds llama.cpp);
it answers one request at a time (`--interrupt_requests False`: by default a new request cuts off the running one).
Clients and servers share this machine's cores: on 2 cores the clients' own work is part of what is measured.
"""

import argparse
import importlib.util
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from llmbook.book import load_json, open_run
from llmbook.deployment import benchmark_table, serving_benchmark


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(command: list[str], env: dict, ready: str) -> tuple[subprocess.Popen, Path]:
    "Start a server and wait until `ready` answers 200; its process and log."
    log = Path(tempfile.mkdtemp(prefix="bench-serve-")) / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(command, env=env, stdout=out, stderr=out)
    for _ in range(1500):
        try:
            if httpx.get(ready).status_code == 200:
                return server, log
        except httpx.TransportError:
            pass
        if server.poll() is not None:
            sys.exit(log.read_text()[-3000:])
        time.sleep(0.2)
    server.terminate()
    sys.exit(f"{' '.join(command)} was not ready after 300 s")


def measure(name: str, url: str, model: str, key: str | None, args, extra: dict) -> list[dict]:
    concurrency = [int(c) for c in args.concurrency.split(",")]
    waves = serving_benchmark(
        url, model, key, concurrency, args.requests, args.prompt_words, args.new_tokens, extra=extra
    )
    print(f"\n{name}: {args.requests} streamed requests per wave, {args.prompt_words}-word prompts, ")
    print(f"{args.new_tokens} new tokens each\n")
    print(benchmark_table(waves))
    return waves


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--model", default="sft", help="a model of the run (Chapter 6 wrote GGUF files of sft)")
    parser.add_argument("--gguf", default="F16", help="which of Chapter 6's GGUF files llama.cpp serves")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    config = load_json(f"{args.run_dir}/config.json")
    run = open_run(config["preset"], args.run_dir, config["overrides"], write=False)
    key, port = secrets.token_hex(16), free_port()
    command = [str(Path(sys.executable).parent / "llmbook"), "serve", "--run-dir", args.run_dir, "--model", args.model]
    command += ["--scanners", "none"]  # llama.cpp's server scans nothing either: the engines, like for like
    env = dict(os.environ, LLMBOOK_API_KEY=key)
    server, _ = start([*command, "--port", str(port)], env, f"http://127.0.0.1:{port}/health")
    try:
        ours = measure(f"llmbook serve --model {args.model}", f"http://127.0.0.1:{port}", args.model, key, args, None)
    finally:
        server.terminate()
        server.wait(timeout=60)
    gguf = run.artifact(f"model/compressed/gguf/{args.model}-{args.gguf}.gguf")
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("sse_starlette") is None:
        print("\nllama-cpp-python[server] is not installed: no comparison with llama.cpp's server.")
        return
    if not gguf.is_file():
        sys.exit(f"{gguf} is missing: Chapter 6 writes GGUF files of sft")
    port = free_port()
    threads = str(os.cpu_count())
    llama = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--port",
        str(port),
        "--n_threads",
        threads,
    ]
    llama += ["--n_ctx", str(run.cfg.seq_len), "--model_alias", args.model]
    llama += ["--interrupt_requests", "False"]  # by default a new request cuts off the one being streamed
    server, _ = start(llama, dict(os.environ), f"http://127.0.0.1:{port}/v1/models")
    try:
        extra = dict(min_tokens=args.new_tokens)  # its way of asking for exactly max_tokens tokens
        theirs = measure(f"llama.cpp ({gguf.name})", f"http://127.0.0.1:{port}", args.model, None, args, extra)
    finally:
        server.terminate()
        server.wait(timeout=60)
    print("\nclients | ours / llama.cpp, tokens/s")
    print("---|---")
    for a, b in zip(ours, theirs):
        print(f"{a['clients']} | {a['tokens_per_s'] / b['tokens_per_s']:.2f}×")


if __name__ == "__main__":
    main()
