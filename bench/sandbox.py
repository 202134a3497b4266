"""The tool sandbox: normal calls evaluated in this process against calls through the worker process.

Same expressions (the held-out-style tool problems of Chapter 5: multi-digit arithmetic and small Python
expressions), same limits. `evaluate_expression` walks the tree here; `sandbox_eval` sends each expression to the
long-lived worker (a bare interpreter under RLIMIT_AS and RLIMIT_CPU) and reads its answer from a pipe;
`sandbox_eval_many` sends them all in one request. Prints calls per second of each and the cost of the round
trip; also the time to start a worker (paid once, and again only after a worker is killed).

    .venv/bin/python bench/sandbox.py [--calls 5000] [--repeats 3]
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import statistics
import time

from llmbook import post_training as P


def calls_per_second(evaluate, expressions, repeats: int) -> float:
    "Median rate over `repeats` passes of `evaluate` over every expression."
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        for e in expressions:
            evaluate(e)
        rates.append(len(expressions) / (time.perf_counter() - started))
    return statistics.median(rates)


def batched_calls_per_second(expressions, repeats: int) -> float:
    "Median rate when every expression goes to the worker in one request (`sandbox_eval_many`)."
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        P.sandbox_eval_many(expressions)
        rates.append(len(expressions) / (time.perf_counter() - started))
    return statistics.median(rates)


def worker_start_seconds(repeats: int) -> float:
    "Median time from starting a worker to its first answer."
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        worker = P.SandboxWorker()
        worker.evaluate_many(["1 + 1"], P.SandboxLimits())
        times.append(time.perf_counter() - started)
        worker.stop()
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    expressions = [p["expression"] for p in P.tool_problems(args.calls, seed=0)]
    P.sandbox_eval("1 + 1")  # the worker is started once, before timing
    rows = {
        "in this process": calls_per_second(P.evaluate_expression, expressions, args.repeats),
        "worker process": calls_per_second(P.sandbox_eval, expressions, args.repeats),
        "worker, 1 batch": batched_calls_per_second(expressions, args.repeats),
    }
    start = worker_start_seconds(args.repeats)
    ratio = rows["in this process"] / rows["worker process"]
    round_trip_us = (1 / rows["worker process"] - 1 / rows["in this process"]) * 1e6
    print(f"{len(expressions)} tool expressions (e.g. {expressions[0]!r}), median of {args.repeats} passes")
    print(f"{'':>16} {'calls/s':>9} {'µs/call':>8}")
    for name, rate in rows.items():
        print(f"{name:>16} {rate:9.0f} {1e6 / rate:8.1f}")
    print(
        f"the worker costs {ratio:.1f}× per call ({round_trip_us:.0f} µs of round trip); "
        f"starting one: {start * 1000:.0f} ms"
    )
    print(
        json.dumps(
            dict(
                bench="sandbox",
                calls=len(expressions),
                in_process_calls_per_s=round(rows["in this process"]),
                worker_calls_per_s=round(rows["worker process"]),
                worker_batched_calls_per_s=round(rows["worker, 1 batch"]),
                ratio_in_process_vs_worker=round(ratio, 2),
                round_trip_us=round(round_trip_us, 1),
                worker_start_ms=round(start * 1000, 1),
            )
        )
    )


if __name__ == "__main__":
    main()
