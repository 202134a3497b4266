"""Serving under load: `llmbook serve` answering streamed requests from 1, 4, 16 and 64 concurrent clients.

The bench starts `llmbook serve` as its own process (as an operator would) on a free loopback port and sends the
same `--requests` streamed completions at each concurrency: validation windows of `--prompt-tokens` tokens, each
continued by exactly `--new-tokens` tokens (greedy, end-of-turn ignored: vLLM's `ignore_eos`), from clients that
each send their next request when the previous one ends. For each concurrency it prints:

- request throughput and generated tokens per second over the whole wave;
- time to first token (TTFT) and inter-token latency (ITL, the gaps between streamed chunks), p50 and p99;
- time per output token (TPOT: after the first, per request), p50;
- throughput against concurrency 1, i.e. sending the requests one at a time. The issue's goal: ≥ 4× at 16 clients.

    .venv/bin/python bench/serve.py --run-dir runs/cpu [--model base] [--requests 64] [--new-tokens 32]

Client and server share this machine's cores: on 2 cores the clients' own work is part of what is measured.
llama.cpp's server (`python -m llama_cpp.server`) needs llama-cpp-python's `[server]` extras, which the book does not
install; that comparison is not made here yet.
"""

import argparse
import asyncio
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from llmbook.book import load_json, open_run
from llmbook.modeling import open_tokens


def windows(run, count: int, length: int) -> list[list[int]]:
    "The first `length` tokens of `count` validation documents at least that long (repeated if there are fewer)."
    ids, index, _ = open_tokens(run.artifact("tokens"), "val")
    long_enough = [offset for offset, n, _ in index.tolist() if n >= length]
    return [ids[offset : offset + length].tolist() for offset in (long_enough * count)[:count]]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_request(client: httpx.AsyncClient, url: str, headers: dict, body: dict) -> dict:
    "Send one streamed completion; the arrival time of each chunk that carries text."
    started, arrivals, tokens = time.perf_counter(), [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk["choices"]:
                tokens += 1
                arrivals.append(time.perf_counter())
    return dict(started=started, arrivals=arrivals, ended=time.perf_counter(), chunks=tokens)


async def wave(url: str, headers: dict, bodies: list[dict], concurrency: int) -> dict:
    "All requests through `concurrency` clients; throughput and latencies."
    queue = list(bodies)
    results = []
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def worker():
            while queue:
                body = queue.pop()
                results.append(await one_request(client, url, headers, body))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    ttft = [r["arrivals"][0] - r["started"] for r in results]
    itl = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    tpot = [(r["arrivals"][-1] - r["arrivals"][0]) / max(1, len(r["arrivals"]) - 1) for r in results]
    tokens = sum(b["max_tokens"] for b in bodies)
    return dict(
        requests_per_s=len(bodies) / seconds,
        tokens_per_s=tokens / seconds,
        ttft_p50=percentile(ttft, 0.5),
        ttft_p99=percentile(ttft, 0.99),
        itl_p50=percentile(itl, 0.5),
        itl_p99=percentile(itl, 0.99),
        tpot_p50=statistics.median(tpot),
    )


def start_server(run_dir: str, model: str, port: int, key: str, log: Path) -> subprocess.Popen:
    command = [str(Path(sys.executable).parent / "llmbook"), "serve", "--run-dir", run_dir, "--model", model]
    with open(log, "w") as out:
        return subprocess.Popen(
            [*command, "--port", str(port)], env=dict(os.environ, LLMBOOK_API_KEY=key), stdout=out, stderr=out
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--model", default="base", help="a model directory under the run's model/")
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    config = load_json(f"{args.run_dir}/config.json")
    run = open_run(config["preset"], args.run_dir, config["overrides"], write=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    key, log = secrets.token_hex(16), Path(tempfile.mkdtemp(prefix="bench-serve-")) / "server.log"
    server = start_server(args.run_dir, args.model, port, key, log)
    url, headers = f"http://127.0.0.1:{port}", {"authorization": f"Bearer {key}"}
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if server.poll() is not None:
            sys.exit(log.read_text()[-2000:])
        time.sleep(0.2)
    bodies = [
        dict(model=args.model, prompt=p, max_tokens=args.new_tokens, temperature=0, ignore_eos=True, stream=True)
        for p in windows(run, args.requests, args.prompt_tokens)
    ]
    print(f"llmbook serve --model {args.model}: {len(bodies)} streamed requests per wave, each {args.prompt_tokens}")
    print(f"prompt tokens and {args.new_tokens} new ones\n")
    print("clients | requests/s | tokens/s | vs 1 client | TTFT p50 / p99 ms | ITL p50 / p99 ms | TPOT p50 ms")
    print("---|---|---|---|---|---|---")
    try:
        asyncio.run(wave(url, headers, bodies[:4], 4))  # warm-up
        first = None
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            r = asyncio.run(wave(url, headers, bodies, concurrency))
            first = first or r["requests_per_s"]
            print(
                f"{concurrency} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
                f"{r['requests_per_s'] / first:.1f}× | {1000 * r['ttft_p50']:.0f} / {1000 * r['ttft_p99']:.0f} | "
                f"{1000 * r['itl_p50']:.1f} / {1000 * r['itl_p99']:.1f} | {1000 * r['tpot_p50']:.1f}"
            )
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
