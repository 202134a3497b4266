"""Chapter 2's pipeline, step by step: MB/s per core of today's code against a baseline commit, in one run.

Each pipeline runs in a fresh process, one after the other, on the same catalog (the preset's installation at
its `data_mb`): the baseline's module (`git show BASELINE:llmbook/data.py`, one process), then this checkout's on
one process and on `--procs` processes, in turn, `--repeat` times each. Prints each step's seconds and MB/s per
core (the step's input bytes / seconds / processes) of each configuration's median run, the ratios the issue asks
for (of the median totals), the peak memory of each run, and whether every run kept the same documents with the
same ledgers. The repeats are there because a core of this kind of machine is not always as fast as itself: a
loop of pure Python measured 0.57 s in one hour and 0.58 to 0.83 s in the next, and up to 0.97 s beside a twin.
`TMPDIR=/dev/shm` keeps the disk's write-back (hundreds of MB of shards per run) out of the timings.

So that a ratio can be read against the machine it was measured on, the host is measured too, before and after
each pair of runs: a fixed load of Python (parsing, regular expressions, a loop) alone and as `--procs` copies at
once. Its ratio (copies × alone / together) is what this host gives `--procs` processes that share nothing, at that
moment: 2.0 on two free cores; measured here, from 1.56 to 1.98 within ten minutes, and 1.42 in a slow hour (25
parses of Chapter 2's module: 0.81 s alone, 1.14 s as two at once). The pipeline's ratio is read next to it.

`--mb N` reads N MB instead: the installation again and again, each copy with its long words renamed (a different
text to every filter, still valid Python), to measure throughput, memory and the ratio at scale (this checkout's code
on one and on `--procs` processes; the baseline reads the preset's catalog only). What a step costs once, however
large the corpus — starting its workers (~50 ms a step for a main process of a few hundred MB), the small sources
read before and after the installation — weighs less there than on the `cpu` preset's 68 MB.

    .venv/bin/python bench/data.py [--preset cpu] [--procs 2] [--repeat 3] [--baseline c6d3eb8]
    .venv/bin/python bench/data.py --mb 300 --procs 2
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import ast
import functools
import hashlib
import importlib.util
import json
import multiprocessing
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "c6d3eb8"  # main before issue 20: Chapter 2 on one process
STEPS = ("acquisition", "ingestion", "license", "exact dedup", "quality", "near dedup: signatures")
STEPS += ("near dedup: LSH + clusters", "near dedup: filter", "privacy & safety", "curriculum & splits")


def baseline_module(commit: str):
    "Chapter 2's module as it was at `commit`, imported under another name."
    source = subprocess.run(["git", "show", f"{commit}:llmbook/data.py"], cwd=ROOT, capture_output=True, text=True)
    if source.returncode:
        raise SystemExit(f"cannot read llmbook/data.py at {commit}: {source.stderr.strip()}")
    path = Path(tempfile.mkdtemp()) / "baseline_data.py"
    path.write_text(re.sub(r"^from \.(\w+) import", r"from llmbook.\1 import", source.stdout, flags=re.M))
    spec = importlib.util.spec_from_file_location("baseline_data", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_LONG_WORD = re.compile(rb"\b([A-Za-z]{9,})\b")


def renamed(read, k: int) -> bytes:
    "What `read()` gives, with every word of 9 letters or more renamed (word + k): picklable, for the workers."
    return _LONG_WORD.sub(rb"\g<1>" + str(k).encode(), read())


def varied_catalog(D, cfg, copies: int = 1000):
    """The preset's catalog with its installation read again and again: copy k > 0 renames every word of 9 letters
    or more (word + k)."""
    catalog = D.catalog(cfg)  # expressions, the installation, the new domain: the installation is the one shuffled
    installation = next(source for source in catalog if source.shuffled)
    items = D.reading_order(installation.items())

    def copy_of(item, k):
        read = item.read if k == 0 else functools.partial(renamed, item.read, k)
        return replace(item, path=f"copy-{k}/{item.path}", read=read)

    copied = lambda: (copy_of(item, k) for k in range(copies) for item in items)
    return [replace(source, items=copied, shuffled=False) if source is installation else source for source in catalog]


def acquisition_seconds(D, sources, budget: float) -> float:
    "Reading the items the pipeline reads (until the budget's bytes), and nothing else."
    started, kept = time.perf_counter(), 0
    for source in sources:
        for item in D.reading_order(source.items()) if source.shuffled else source.items():
            if kept >= budget:
                break
            data, _ = D.read_item(item)
            kept += len(data or b"")
    return time.perf_counter() - started


class AnonymousMemory(threading.Thread):
    """Peak anonymous memory (not the memory-mapped shards, which the kernel can drop) of this process, and of this
    process with its workers (Pss_Anon: a page shared by forked processes is counted once), sampled every second:
    a sample takes the kernel ~25 ms of a core (it walks every mapping), and every 0.2 s it took 12% of one."""

    def __init__(self):
        super().__init__(daemon=True)
        self.main = self.total = 0
        self.running = True

    @staticmethod
    def pss_anon(pid: int) -> int:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            return 0
        return int(re.search(r"Pss_Anon:\s+(\d+) kB", rollup).group(1)) << 10

    def run(self):
        me = psutil.Process()
        while self.running:
            main = self.pss_anon(me.pid)
            workers = sum(self.pss_anon(child.pid) for child in me.children(recursive=True))
            self.main, self.total = max(self.main, main), max(self.total, main + workers)
            time.sleep(1.0)


def fingerprint(ds) -> str:
    "sha256 over every row of a dataset, in order."
    digest = hashlib.sha256()
    for batch in ds.iter(batch_size=1024):
        for row in zip(*batch.values()):
            digest.update(repr(row).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:16]


def pipeline(which: str, preset: str, procs: int, mb: float, baseline: str) -> dict:
    "Run Chapter 2's steps once (in this process) and measure each."
    from llmbook.book import make_preset
    from llmbook.foundations import LICENSE_POLICY

    D = baseline_module(baseline) if which == "baseline" else __import__("llmbook.data", fromlist=["data"])
    parallel = {} if which == "baseline" else dict(num_proc=procs)
    cfg = make_preset(preset)
    budget = (mb or cfg.data_mb) * 1e6
    sources = varied_catalog(D, cfg) if mb else D.catalog(cfg)
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    seconds, inputs = {}, {}
    memory = AnonymousMemory()
    memory.start()

    def timed(name, function, *args, **kwargs):
        started = time.perf_counter()
        result = function(*args, **kwargs)
        seconds[name] = time.perf_counter() - started
        return result

    try:
        acquisition_seconds(D, sources, budget)  # warm the file cache: every run reads from memory
        seconds["acquisition"] = acquisition_seconds(D, sources, budget)
        raw, acquisition, ingestion = timed(
            "ingest", D.ingest, sources, budget, work, work / "manifest.jsonl", **parallel
        )
        seconds["ingestion"] = seconds.pop("ingest") - seconds["acquisition"]
        inputs["acquisition"] = inputs["ingestion"] = acquisition.kept_bytes
        ledgers = [acquisition, ingestion]
        licensed, ledger = timed("license", D.license_step, raw, work, LICENSE_POLICY, **parallel)
        ledgers.append(ledger)
        deduped, ledger = timed("exact dedup", D.exact_dedup_step, licensed, work, **parallel)
        ledgers.append(ledger)
        quality, ledger = timed("quality", D.quality_step, deduped, work, **parallel)
        ledgers.append(ledger)
        signatures = timed("near dedup: signatures", D.corpus_signatures, quality, **parallel)
        timed("near dedup: LSH + clusters", D.near_duplicate_clusters, signatures)
        filtered, ledger = timed("near dedup", D.near_dedup_step, quality, work, **parallel)
        # the step's seconds less its two parts timed apart (below 0 if they ran slower apart): the sum stays exact
        seconds["near dedup: filter"] = (
            seconds.pop("near dedup") - seconds["near dedup: signatures"] - seconds["near dedup: LSH + clusters"]
        )
        ledgers.append(ledger)
        private, ledger = timed("privacy & safety", D.privacy_step, filtered, work, D.load_blocklist(), **parallel)
        ledgers.append(ledger)
        timed("curriculum & splits", D.write_corpus, private, work / "corpus", **parallel)
        for ledger in ledgers[2:]:
            inputs[ledger.step] = ledger.in_bytes
        inputs["near dedup: signatures"] = inputs["near dedup: LSH + clusters"] = inputs["near dedup: filter"] = (
            ledgers[5].in_bytes
        )
        inputs["curriculum & splits"] = ledgers[6].out_bytes
        ledger_json = [
            {k: v for k, v in asdict(ledger).items() if k != "examples" or ledger.step != "ingestion"}
            for ledger in ledgers
        ]
        return dict(
            which=which,
            procs=1 if which == "baseline" else procs,
            raw_bytes=acquisition.kept_bytes,
            seconds=seconds,
            inputs=inputs,
            kept=fingerprint(private),
            documents=len(private),
            ledgers=hashlib.sha256(json.dumps(ledger_json, sort_keys=True).encode()).hexdigest()[:16],
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            peak_anonymous_mb=memory.main / 1e6,
            peak_anonymous_with_workers_mb=memory.total / 1e6,
        )
    finally:
        memory.running = False
        shutil.rmtree(work, ignore_errors=True)


def fixed_load(_=None) -> float:
    "Seconds of a fixed load of Python on one core: parsing this file, a regular expression over it, a loop."
    source = Path(__file__).read_text() * 4
    started = time.perf_counter()
    for _ in range(20):
        ast.parse(source)
        re.findall(r"\w+", source.lower())
    total = 0
    for i in range(5_000_000):
        total += i
    return time.perf_counter() - started


def host_ratio(procs: int) -> float:
    "What this host gives `procs` processes now: `procs` × the fixed load alone / the same load as `procs` at once."
    alone = fixed_load()
    # a plain pool, in this process that has not imported the book: the host is measured, not Chapter 2's workers
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        together = max(pool.map(fixed_load, range(procs)))
    return procs * alone / together


def run_fresh(which: str, args) -> dict:
    "One pipeline in a fresh Python process (its own peak memory, no warm caches but the file system's)."
    command = [sys.executable, __file__, "--one", which, "--preset", args.preset, "--procs", str(args.procs)]
    command += ["--mb", str(args.mb), "--baseline", args.baseline]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{which} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def rate(run: dict, step: str) -> float:
    "MB/s per core of one step in one run."
    return run["inputs"][step] / 1e6 / max(run["seconds"][step], 1e-9) / run["procs"]


def total_rate(run: dict) -> float:
    "MB/s per core of the whole pipeline: raw text in over every step's seconds."
    return run["raw_bytes"] / 1e6 / sum(run["seconds"].values()) / run["procs"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--mb", type=float, default=0.0)
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--repeat", type=int, default=3, help="runs of this checkout on 1 and on --procs processes")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(pipeline(args.one, args.preset, args.procs, args.mb, args.baseline)))
        return
    runs = [] if args.skip_baseline or args.mb else [run_fresh("baseline", args)]
    one_process = argparse.Namespace(**{**vars(args), "procs": 1})
    repeats, hosts = [], []
    for _ in range(args.repeat):  # the host measured before and after each pair of runs
        before = host_ratio(args.procs)
        repeats.append((run_fresh("new", one_process), run_fresh("new", args)))
        hosts.append((before + host_ratio(args.procs)) / 2)
    configurations = list(zip(*repeats))  # the runs on one process, then those on --procs
    totals = [[sum(run["seconds"].values()) for run in config] for config in configurations]
    one, many = (config[t.index(statistics.median_low(t))] for config, t in zip(configurations, totals))
    every = [run for pair in repeats for run in pair]  # this checkout's runs: to check that they all kept the same
    runs += [one, many]
    corpus = f"{args.mb:g} MB of the varied installation" if args.mb else f"the {args.preset} preset's catalog"
    print(f"Chapter 2 on {corpus}: {many['raw_bytes'] / 1e6:,.0f} MB of raw text, {many['documents']:,} documents kept")
    names = [f"{r['which']} ×{r['procs']}" for r in runs]
    print(f"\n{'step':28s}" + "".join(f"{n + ' s':>14s}{n + ' MB/s/core':>22s}" for n in names))
    # the filter's seconds are near dedup's minus its signatures' and LSH's, timed apart: under 10 ms, not a rate
    rate_text = lambda r, step: f"{rate(r, step):22.2f}" if r["seconds"][step] >= 0.01 else f"{'—':>22s}"
    for step in STEPS:
        print(f"{step:28s}" + "".join(f"{max(0.0, r['seconds'][step]):14.2f}{rate_text(r, step)}" for r in runs))
    print(f"{'whole pipeline':28s}" + "".join(f"{sum(r['seconds'].values()):14.2f}{total_rate(r):22.2f}" for r in runs))
    print(f"{'peak RSS, main (MB)':28s}" + "".join(f"{r['peak_rss_mb']:14.0f}{'':22s}" for r in runs))
    print(f"{'peak anonymous, main (MB)':28s}" + "".join(f"{r['peak_anonymous_mb']:14.0f}{'':22s}" for r in runs))
    print(
        f"{'  with its workers (MB)':28s}"
        + "".join(f"{r['peak_anonymous_with_workers_mb']:14.0f}{'':22s}" for r in runs)
    )
    per_document = many["peak_anonymous_mb"] * 1e6 / max(1, many["documents"])
    print(f"\npeak anonymous memory of the main process per document kept: {per_document / 1e3:.1f} kB")
    seconds = [[round(t, 2) for t in ts] for ts in totals]
    print(f"whole pipeline, each repeat: ×1 {seconds[0]} s, ×{args.procs} {seconds[1]} s")
    pairs = [a / b for a, b in zip(*totals)]
    ratios = lambda values: ", ".join(f"{r:.2f}×" for r in values)
    print(f"each pair: {ratios(pairs)}; the host's fixed load at the same moments: {ratios(hosts)}")
    speedup = sum(one["seconds"].values()) / sum(many["seconds"].values())
    efficiency = speedup / args.procs
    print(f"{args.procs} processes: {speedup:.2f}× one process (median runs; parallel efficiency {efficiency:.0%})")
    host, share = statistics.median(hosts), statistics.median(pairs) / statistics.median(hosts)
    print(f"the host's fixed load: {host:.2f}× (median); the pipeline got {share:.0%} of that")
    if runs[0]["which"] == "baseline":
        print(
            f"one process: {total_rate(one) / total_rate(runs[0]):.2f}× the baseline's MB/s per core ({args.baseline})"
        )
        same_as_baseline = runs[0]["kept"] == one["kept"]
        print(
            f"the baseline kept {runs[0]['documents']:,} documents, "
            + ("the same ones" if same_as_baseline else "not the same: its filters are older (a pattern fixed since)")
        )
    same = {(r["kept"], r["ledgers"], r["documents"]) for r in every}
    print(
        "same documents kept and same ledgers in every run of this checkout:",
        len(same) == 1,
        sorted({r["kept"] for r in every}),
    )
    per_core = total_rate(many)
    gpu_minutes = 2_000 / (per_core * 8) / 60
    print(
        f"the gpu preset's 2,000 MB on 8 cores at {per_core:.2f} MB/s per core: {gpu_minutes:.1f} minutes (projected)"
    )


if __name__ == "__main__":
    main()
