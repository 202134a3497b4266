"""Near-duplicate detection: llmbook's MinHash + LSH against datasketch's MinHash + MinHashLSH.

Same documents (real standard-library files with planted near-duplicates of known similarity), same
shingles (5-word), same LSH shape (14 bands × 8 rows), one thread. Prints documents per second of each
and the precision and recall of the candidate pairs each finds, against the exact Jaccard similarity.

    .venv/bin/python bench/dedup.py [--bases 200] [--repeats 3]
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import statistics
import sysconfig
import time
from pathlib import Path

from datasketch import MinHash, MinHashLSH

from llmbook import data as D


def standard_library_bases(n: int) -> list[str]:
    "Real documents: standard-library modules of a few hundred to a few thousand words, no two of them similar."
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    return D.dissimilar_bases((p.read_text(encoding="utf-8", errors="replace") for p in paths), n)


def ours(texts):
    return D.candidate_pairs(D.minhash_signatures(texts))


def datasketch(texts):
    minhashes = MinHash.bulk([list(D.shingle_set(t)) for t in texts], num_perm=D.NUM_PERM)
    lsh = MinHashLSH(num_perm=D.NUM_PERM, params=(D.BANDS, D.ROWS))
    for i, m in enumerate(minhashes):
        lsh.insert(i, m)
    return {(min(i, j), max(i, j)) for i, m in enumerate(minhashes) for j in lsh.query(m) if j != i}


def timed(fn, texts, repeats):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(texts)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    bases = standard_library_bases(args.bases)
    texts, family = D.planted_near_duplicates(bases, seed=0)
    truth, near_threshold = D.true_duplicate_pairs(texts, family)
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    rows = {}
    for name, fn in (("llmbook", ours), ("datasketch", datasketch)):
        seconds, found = timed(fn, texts, args.repeats)
        rows[name] = dict(
            seconds=seconds,
            docs_per_s=len(texts) / seconds,
            mb_per_s=megabytes / seconds,
            **D.pair_quality(found, truth, near_threshold),
        )
    print(
        f"{len(texts)} documents ({len(bases)} bases + {len(D.PLANTED_SIMILARITIES)} variants each), "
        f"{megabytes:.1f} MB; "
        f"{len(truth)} true duplicate pairs, {len(near_threshold)} pairs within {D.MARGIN} of the threshold not scored"
    )
    print(f"{'':>11} {'seconds':>8} {'docs/s':>9} {'MB/s':>6} {'precision':>9} {'recall':>7}")
    for name, r in rows.items():
        print(
            f"{name:>11} {r['seconds']:8.3f} {r['docs_per_s']:9.0f} {r['mb_per_s']:6.2f} "
            f"{r['precision']:9.3f} {r['recall']:7.3f}"
        )
    ratio = rows["llmbook"]["docs_per_s"] / rows["datasketch"]["docs_per_s"]
    print(f"llmbook / datasketch throughput: {ratio:.1f}×")
    print(
        json.dumps(
            dict(
                bench="dedup",
                docs=len(texts),
                mb=round(megabytes, 2),
                ratio_vs_datasketch=round(ratio, 2),
                docs_per_s=round(rows["llmbook"]["docs_per_s"]),
                datasketch_docs_per_s=round(rows["datasketch"]["docs_per_s"]),
                precision=round(rows["llmbook"]["precision"], 4),
                recall=round(rows["llmbook"]["recall"], 4),
                datasketch_precision=round(rows["datasketch"]["precision"], 4),
                datasketch_recall=round(rows["datasketch"]["recall"], 4),
            )
        )
    )


if __name__ == "__main__":
    main()
