"""Chapter 2, Data: a corpus of malformed input accounted for to the byte, license normalization, MinHash
and LSH (against exact Jaccard and datasketch), PII and unsafe-content detection, splits and curriculum."""

import email.utils
import ipaddress
import json
import multiprocessing.pool
import os
import random
import smtplib
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from llmbook import data as D
from llmbook.book import make_preset


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return len(data)


@pytest.fixture(scope="module")
def messy_corpus(tmp_path_factory):
    """A directory and a local dataset holding every kind of bad input, with the bytes each should count."""
    root = tmp_path_factory.mktemp("messy")
    src, hf = root / "src", root / "hf"
    good = {
        "pkg/good.py": b'"""A module."""\n\ndef add(a, b):\n    """Add two numbers."""\n    return a + b  # plainly\n'
        * 3,
        "pkg/latin1.py": "# -*- coding: latin-1 -*-\nname = 'Jos\xe9'\nprint(name)\n".encode("latin-1"),
        "docs/guide.md": "# Guide\n\nSome prose about the package, long enough to be a document.\n".encode() * 4,
        "docs/almost.txt": b"caf\xe9 " + b"fine text " * 300,  # one bad byte: repaired
        "docs/controls.txt": b"bell\x07 and escape\x1b[0m and CRLF\r\nend\r\n" * 10,
    }
    kept = sum(write(src / name, content) for name, content in good.items())
    undecodable = write(src / "bad/latin_soup.txt", bytes(range(128, 256)) * 40)
    binary = write(src / "bad/nul.py", b"x = 1\n\x00\x00\x00binary\n")
    empty = write(src / "bad/empty.txt", b"")
    with open(src / "bad/huge.txt", "wb") as fh:  # a 100 MB single line
        for _ in range(100):
            fh.write(b"y" * (1 << 20))
    huge = (src / "bad/huge.txt").stat().st_size
    (src / "bad/dangling.py").symlink_to(src / "bad/nowhere.py")
    (src / "bad/loop_a.txt").symlink_to(src / "bad/loop_b.txt")
    (src / "bad/loop_b.txt").symlink_to(src / "bad/loop_a.txt")
    os.mkfifo(src / "bad/pipe.txt")  # reading it would block forever
    link_bytes = {n: os.lstat(src / "bad" / n).st_size for n in ("dangling.py", "loop_a.txt", "loop_b.txt")}
    write(src / "bad/image.png", b"\x89PNG\r\n")  # not a text suffix: never an item
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "first row of a local dataset, in prose"}, {"text": "second row, with more words in it"}]
    hf.mkdir()
    (hf / "part.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.table({"text": ["a parquet row"] * 200}), hf / "cut.parquet")
    whole = (hf / "cut.parquet").read_bytes()
    truncated = write(hf / "cut.parquet", whole[: len(whole) // 2])
    row_bytes = sum(len(r["text"].encode()) for r in rows)
    return dict(
        root=root,
        src=src,
        hf=hf,
        kept=kept + row_bytes,
        undecodable=undecodable,
        binary=binary,
        empty=empty,
        huge=huge,
        links=link_bytes,
        truncated=truncated,
    )


def test_malformed_input_is_counted_to_the_byte(messy_corpus, tmp_path):
    c = messy_corpus
    sources = [D.directory_source(c["src"], "MIT"), D.hf_source(f"{c['hf']}|CC0-1.0")]
    raw, acquisition, ingestion = D.ingest(sources, 1e12, tmp_path / "work", tmp_path / "manifest.jsonl")
    dropped = acquisition.dropped
    assert dropped["too large"] == [1, c["huge"]]
    assert dropped["unreadable (symbolic link (not followed))"] == [3, sum(c["links"].values())]
    assert dropped["unreadable (not a regular file)"] == [1, 0]
    malformed = [k for k in dropped if k.startswith("unreadable (malformed dataset file after 0 rows")]
    assert len(malformed) == 1 and dropped[malformed[0]] == [1, c["truncated"]]
    assert ingestion.dropped == {
        "undecodable": [1, c["undecodable"]],
        "binary (NUL bytes)": [1, c["binary"]],
        "empty": [1, 0],
    }
    assert ingestion.kept_bytes == c["kept"]
    assert (
        acquisition.in_bytes
        == c["kept"] + c["undecodable"] + c["binary"] + c["huge"] + sum(c["links"].values()) + c["truncated"]
    )
    manifest = [json.loads(l) for l in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == acquisition.in_docs and sum(m["bytes"] for m in manifest) == acquisition.in_bytes
    texts = dict(zip(raw["path"], raw["text"]))
    assert texts["pkg/latin1.py"].startswith("# -*- coding: latin-1 -*-\nname = 'José'")
    assert "\x07" not in texts["docs/controls.txt"] and "\r" not in texts["docs/controls.txt"]
    assert "\ufffd" in texts["docs/almost.txt"]
    # the rest of the pipeline runs on it and every ledger chains to the next
    from llmbook.foundations import LICENSE_POLICY

    licensed, l1 = D.license_step(raw, tmp_path / "work", LICENSE_POLICY)
    deduped, l2 = D.exact_dedup_step(licensed, tmp_path / "work")
    quality, l3 = D.quality_step(deduped, tmp_path / "work")
    near, l4 = D.near_dedup_step(quality, tmp_path / "work")
    private, l5 = D.privacy_step(near, tmp_path / "work", D.load_blocklist())
    D.check_chain([acquisition, ingestion, l1, l2, l3, l4, l5])


def test_license_normalization():
    cases = {
        ("", "MIT License", ()): "MIT",
        ("", "Apache 2.0", ()): "Apache-2.0",
        ("", "BSD", ("License :: OSI Approved :: BSD License",)): "BSD-3-Clause",
        ("MIT OR Apache-2.0", "", ()): "MIT OR Apache-2.0",
        ("", "PSFL", ()): "PSF-2.0",
        ("", "UNKNOWN", ()): "NOASSERTION",
        ("", "Permission is hereby granted, free of charge, to any person", ()): "MIT",
        ("", "GPLv3+", ()): "GPL-3.0-or-later",
        ("", "", ("License :: OSI Approved :: GNU General Public License v3 (GPLv3)",)): "GPL-3.0-only",
    }
    for (expression, field, classifiers), spdx in cases.items():
        assert D.normalize_license(expression, field, classifiers) == spdx, (expression, field)


def test_minhash_is_deterministic_and_batch_independent():
    rng = random.Random(0)
    texts = [
        " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "x1", "y2"]) for _ in range(rng.randint(0, 400)))
        for _ in range(50)
    ]
    texts += ["word " * 30000 + " ".join(str(i) for i in range(20000))]  # longer than one 64 KiB slice
    together = D.minhash_signatures(texts)
    alone = np.stack([D.minhash_signatures([t])[0] for t in texts])
    assert (together == alone).all()
    assert (together[[i for i, t in enumerate(texts) if not t.split()]] == 0xFFFFFFFF).all()
    code = (
        "import numpy as np\nfrom llmbook.data import minhash_signatures\n"
        "print(minhash_signatures(['the same text in another process']).tobytes().hex())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == D.minhash_signatures(["the same text in another process"]).tobytes().hex()


def test_minhash_estimates_jaccard_like_datasketch():
    from datasketch import MinHash

    rng = random.Random(1)
    vocabulary = [f"w{i}" for i in range(3000)]
    base = [" ".join(rng.choice(vocabulary) for _ in range(600)) for _ in range(20)]
    pairs = [(b, D.replace_words(b, f, rng)) for b in base for f in (0.01, 0.05, 0.1, 0.3)]
    exact = np.array([D.jaccard(D.shingle_set(a), D.shingle_set(b)) for a, b in pairs])
    sig = D.minhash_signatures([t for p in pairs for t in p])
    ours = (sig[0::2] == sig[1::2]).mean(axis=1)

    def theirs(t):
        m = MinHash(num_perm=D.NUM_PERM)
        m.update_batch(list(D.shingle_set(t)))
        return m

    ds = np.array([theirs(a).jaccard(theirs(b)) for a, b in pairs])
    assert abs((ours - exact).mean()) < 0.02 and np.abs(ours - exact).mean() < 0.05
    assert abs(np.abs(ours - exact).mean() - np.abs(ds - exact).mean()) < 0.02


def test_planted_near_duplicates_are_found():
    rng = random.Random(2)
    vocabulary = [f"tok{i}" for i in range(5000)]
    bases = [" ".join(rng.choice(vocabulary) for _ in range(400)) for _ in range(40)]
    texts, family = D.planted_near_duplicates(bases, seed=3)
    truth, near = D.true_duplicate_pairs(texts, family)
    quality = D.pair_quality(D.candidate_pairs(D.minhash_signatures(texts)), truth, near)
    assert quality["recall"] >= 0.95 and quality["precision"] >= 0.95, quality
    assert abs(D.candidate_probability((1 / D.BANDS) ** (1 / D.ROWS)) - 0.5) < 0.15


def test_pii_on_the_planted_set_and_scrubbing():
    scores = D.pii_scores(D.shipped_jsonl("pii_planted.jsonl"))
    for kind, s in scores.items():
        assert s["precision"] >= 0.95 and s["recall"] >= 0.95, (kind, s)
    text, counts = D.scrub("mail me at jane.roe@uni-heidelberg.de or call +49 6221 54 2000")
    assert text == "mail me at <EMAIL> or call <PHONE>" and counts == {"EMAIL": 1, "PHONE": 1}
    assert D.luhn_valid("79927398713") and not D.luhn_valid("79927398710")
    assert D.find_pii("seed = np.random.default_rng(6581432544381372042)") == []


def test_the_fast_pii_paths_find_what_the_patterns_find():
    "Markers, the lines that hold an @, a value assigned: each kind's matches are its pattern's, at the same places."
    planted = [example["text"] for example in D.shipped_jsonl("pii_planted.jsonl")]
    stdlib = [Path(module.__file__).read_text(encoding="utf-8") for module in (smtplib, ipaddress, email.utils)]
    tricky = [
        "key AKIAIOSFODNN7EXAMPLE then ghp_" + "a" * 36 + " sk-" + "b" * 24 + " and AKIAIOSFODNN7EXAMPLE again",
        "-----BEGIN RSA PRIVATE KEY-----\nabc\n-----END RSA PRIVATE KEY----- sk-proj-" + "c" * 30,
        "x@y.com\nfoo.bar@baz.co.uk\n@property\n  a@b.de\nname@host.com",  # addresses at the edges of lines
        "a@b.com@c.org x-@y.io -a@b.io",
        "passwd\n=\n'Ab3dEf5hIj7lMn9zz'",  # a name, a line break, then the value
        "ſecret = 'Ab3dEf5hIj7lMn9'",  # the long s: the same letter as s once case is ignored
        "é token: 'Ab3dEf5hIj7lMn9'",
        "call(password='Ab3dEf5hIj7lMn9zz', token=\"Zz9yX8wV7uT6sR5q\"); d = {'api_key': 'Qw3eRt5yUi7oPa9s'}",
        "é call(password='Ab3dEf5hIj7lMn9zz', token=\"Zz9yX8wV7uT6sR5q\"); d = {'api_key': 'Qw3eRt5yUi7oPa9s'}",
        "+49 6221 54 2000\n(030) 1234 5678\n1.25 2.50\n",  # phones on their lines, and decimals that are not
    ]
    kinds_found = set()
    for text in planted + stdlib + tricky:
        for kind, pattern in D.PII_PATTERNS.items():
            group = 1 if kind == "ASSIGNED_SECRET" else 0  # the lower-cased path starts its match at the name
            found = [m.span(group) for m in D.pii_matches(kind, text)]
            assert found == [m.span(group) for m in pattern.finditer(text)], (kind, text[:80])
            kinds_found |= {kind} if found else set()
    assert kinds_found == set(D.PII_PATTERNS), kinds_found


def test_unsafe_filter_on_the_planted_set():
    blocklist = D.load_blocklist()
    for example in D.shipped_jsonl("unsafe_planted.jsonl"):
        assert (D.unsafe_reason(example["text"], blocklist) is not None) == example["unsafe"], example["text"]


def test_quality_rules():
    assert (
        D.quality_reason("# Auto-generated by tools/gen.py; do not edit\n" + "x = 1\n" * 30, "code")
        == "code: generated file"
    )
    assert (
        D.quality_reason('"""Generated by passing a flag, says this docstring."""\n' + "x = 1\n" * 30, "code") is None
    )
    assert D.quality_reason("T = (\n" + "    0x00, 0x01, 0x02,  # row\n" * 40 + ")\n", "code") == "code: data file"
    assert D.quality_reason("a" * 2000 + "\nb\nc\n", "code") == "code: minified or long lines"
    assert D.quality_reason("Too short to teach anything.", "prose") == "prose: too short"


def test_heldout_and_splits():
    item = D.Item("python", "python-stdlib", "3.11", "fractions.py", "PSF-2.0", "py", 1, lambda: b"")
    assert D.is_heldout(item) and D.module_name(item) == "fractions"
    assert not D.is_heldout(D.Item("python", "numpy", "2", "fractions.py", "BSD-3-Clause", "py", 1, lambda: b""))
    sessions = next(D.expression_source(1, seed=5).items()).read().decode().splitlines()
    assert sessions and not any(D.expression_heldout(l[4:]) for l in sessions if l.startswith(">>> "))
    splits = [D.split_of(dict(heldout=False, source="python", distribution="x", path=f"m{i}.py")) for i in range(4000)]
    assert 0.03 < splits.count("val") / len(splits) < 0.07
    assert D.mixture({"code": 900, "prose": 100}, {"code": 0.5, "prose": 0.5})["epochs"] == {"code": 1.0, "prose": 9.0}


def test_a_source_lost_to_the_license_policy_is_an_error(tmp_path):
    from llmbook.foundations import LICENSE_POLICY

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("Some prose that nobody licensed, long enough to count as a document. " * 3)
    raw, _, _ = D.ingest([D.directory_source(tmp_path / "docs")], 1e9, tmp_path / "work", tmp_path / "m.jsonl")
    with pytest.raises(ValueError, match="dropped by the license policy"):
        D.license_step(raw, tmp_path / "work", LICENSE_POLICY)


def test_surrogate_escape_in_a_docstring(tmp_path):
    (tmp_path / "m.py").write_text('def f():\n    """Lone \\ud800 surrogate."""\n    return 1\n' * 3)
    raw, _, ingestion = D.ingest([D.directory_source(tmp_path, "MIT")], 1e9, tmp_path / "work", tmp_path / "m.jsonl")
    assert ingestion.kept_docs == 1 and all("\ud800" not in t for t in raw["text"])


def test_catalog_of_presets():
    tiny = D.catalog(make_preset("tiny"))
    assert [s.name for s in tiny] == ["synthetic:expressions", "python", "domain:sympy"]
    assert tiny[-1].budget_bytes == make_preset("tiny").domain_mb * 1e6 and tiny[1].budget_bytes is None
    gpu = D.catalog(make_preset("gpu"))
    assert gpu[-2].name == "hf:HuggingFaceFW/fineweb-edu"
    assert (gpu[-1].name, gpu[-1].license, gpu[-1].shuffled) == ("domain:HuggingFaceFW/fineweb-2", "ODC-By-1.0", False)
    assert [s.name for s in D.catalog(make_preset("tiny", "domain="))] == ["synthetic:expressions", "python"]
    with pytest.raises(ValueError, match="no-such-distribution"):
        D.catalog(make_preset("tiny", "domain=no-such-distribution"))


def test_a_source_with_its_own_budget(tmp_path):
    "The shared budget counts only sources without one; a source's own budget stops that source alone."
    for name in ("general", "domain"):
        for i in range(40):
            (tmp_path / name / f"doc{i}.md").parent.mkdir(exist_ok=True)
            (tmp_path / name / f"doc{i}.md").write_text(f"Document {i} of the {name} source, in plain words. " * 20)
    general, domain = D.directory_source(tmp_path / "general", "MIT"), D.directory_source(tmp_path / "domain", "MIT")
    domain.budget_bytes = 5_000
    raw, acquisition, _ = D.ingest([general, domain], 20_000, tmp_path / "work", tmp_path / "m.jsonl")
    by_source = {
        s: sum(len(t.encode()) for t, r in zip(raw["text"], raw["source"]) if r == s) for s in set(raw["source"])
    }
    assert 20_000 <= by_source["dir:general"] < 22_000 and 5_000 <= by_source["dir:domain"] < 7_000, by_source
    splits = {D.split_of(dict(heldout=False, source="domain:x", distribution="x", path=f"m{i}.py")) for i in range(200)}
    assert splits == {"domain_train", "domain_val"}


def test_a_dataset_as_the_domain(tmp_path):
    "A Hugging Face dataset (local files in its format) as Chapter 6's domain: its own budget, its own splits."
    sentence = "Der Hund läuft über die Straße, und die Katze schläft im Garten. "
    (tmp_path / "de.jsonl").write_text(
        "".join(json.dumps(dict(text=f"{i}: " + sentence * 5)) + "\n" for i in range(300))
    )
    cfg = make_preset("tiny", f"domain=hf:{tmp_path / 'de.jsonl'}|CC-BY-SA-4.0 domain_mb=0.02")
    domain = D.catalog(cfg)[-1]
    assert (domain.name, domain.license, domain.budget_bytes) == ("domain:de.jsonl", "CC-BY-SA-4.0", 20_000)
    raw, _, _ = D.ingest([domain], 1e12, tmp_path / "work", tmp_path / "m.jsonl")
    assert set(raw["source"]) == {"domain:de.jsonl"} and set(raw["license"]) == {"CC-BY-SA-4.0"}
    assert 20_000 <= sum(len(t.encode()) for t in raw["text"]) < 21_000
    assert {D.split_of(row) for row in raw} == {"domain_train", "domain_val"}
    with pytest.raises(RuntimeError, match="no/such-dataset"):
        next(D.catalog(make_preset("tiny", "domain=hf:no/such-dataset|MIT"))[-1].items())


# A hostile installation: what a hostile review tried against acquisition. The pipeline runs on it in a child
# process, so that a hang meets a timeout (a guard, not a speed target) and peak memory is the pipeline's own.
HANG_GUARD_S = 300
SPARSE_BYTES = 4 << 30
ONE_LINE_BYTES = 100 << 20
DESCRIPTION_BYTES = 10 << 20
GOOD_PY = b'"""A module."""\n\n\ndef add(a, b):\n    """Add two numbers."""\n    return a + b  # plainly\n' * 4
ODD_NAMES = (b"caf\xe9.py", b"dir\xff/inside.py", b"new\nline.py", b"bell\x07.py")  # legal on Linux, not UTF-8


def _write_at(dir_fd: int, name: str, data: bytes):
    fd = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dir_fd)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _build_deep_tree(top, levels: int = 60, name_chars: int = 100):
    "A tree `levels` deep whose full path outgrows PATH_MAX (4096) on the way down: made relative to open directories."
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for level in range(levels):
        name = f"level{level:02d}".ljust(name_chars, "x")
        os.mkdir(name, dir_fd=fd)
        below = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = below
        if level in (9, levels - 1):
            _write_at(fd, f"depth{level + 1}.py", GOOD_PY)
    os.close(fd)


def _build_hostile_stdlib(stdlib):
    "Files a directory walk meets: names that are not UTF-8, a pipe, link loops, huge files, a deep tree."
    write(stdlib / "fractions.py", GOOD_PY + b"# held out\n")
    write(stdlib / "__pycache__" / "skipped.py", GOOD_PY)
    os.makedirs(os.fsencode(stdlib / "dir") + b"\xff")
    for name in ODD_NAMES:
        with open(os.fsencode(stdlib) + b"/" + name, "wb") as fh:
            fh.write(GOOD_PY + b"# " + name.replace(b"\n", b" ").replace(b"\x07", b" ") + b"\n")
    os.mkfifo(stdlib / "pipe.py")  # opening it would block until a writer comes
    (stdlib / "loop_a.py").symlink_to(stdlib / "loop_b.py")
    (stdlib / "loop_b.py").symlink_to(stdlib / "loop_a.py")
    (stdlib / "dangling.py").symlink_to(stdlib / "nowhere.py")
    (stdlib / "itself").symlink_to(stdlib, target_is_directory=True)  # a directory loop
    with open(stdlib / "sparse.py", "wb") as fh:
        fh.truncate(SPARSE_BYTES)  # 4 GiB of holes: reading it whole would need 4 GiB of memory
    with open(stdlib / "one_line.txt", "wb") as fh:
        for _ in range(ONE_LINE_BYTES >> 20):
            fh.write(b"y" * (1 << 20))
    (stdlib / "deep").mkdir()
    _build_deep_tree(stdlib / "deep")


def _build_hostile_site_packages(site, outside) -> int:
    "Distributions: broken metadata, a 10 MB description, a 4 GiB METADATA, bad RECORDs; the description's size."
    write(outside, b"# a file outside the installation, named by an absolute path in a RECORD\n" * 10)
    description = b"A long description, line after line of it.\n" * (DESCRIPTION_BYTES // 43)
    broken_license = b"License: " + b"(" * 5000 + b"MIT AND\n  \x01 BSD??\nLicense-Expression: MIT AND (\n"
    metadata = b"Metadata-Version: 2.1\nName: hostile\nVersion: 1.0\n" + broken_license + b"\n" + description
    write(site / "hostile-1.0.dist-info" / "METADATA", metadata)
    record = ["hostile/__init__.py,,", "hostile/pipe.py,,", "hostile/missing.py,,", f"{outside},,", "../../x.py,,"]
    write(site / "hostile-1.0.dist-info" / "RECORD", "\n".join(record).encode() + b"\n")
    write(site / "hostile" / "__init__.py", GOOD_PY)
    os.mkfifo(site / "hostile" / "pipe.py")
    write(site / "undecodable-1.0.dist-info" / "METADATA", b"Metadata-Version: 2.1\nName: caf\xe9\nVersion: 1\n\nx\n")
    for name, record in (("badrecord", b"badrecord.py,,\n\xff\xfe\n"), ("longrecord", b"x" * 200_000 + b",,\n")):
        write(
            site / f"{name}-1.0.dist-info" / "METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1\n".encode()
        )
        write(site / f"{name}-1.0.dist-info" / "RECORD", record)  # not UTF-8; a field over csv's limit
    (site / "sparse-1.0.dist-info").mkdir()
    with open(site / "sparse-1.0.dist-info" / "METADATA", "wb") as fh:
        fh.truncate(SPARSE_BYTES)  # parsing it would take 4 GiB
    write(site / "fine-2.0.dist-info" / "METADATA", b"Metadata-Version: 2.1\nName: fine\nVersion: 2.0\nLicense: MIT\n")
    write(site / "fine-2.0.dist-info" / "RECORD", b"fine.py,,\n")
    write(site / "fine.py", GOOD_PY + b"# fine\n")
    return len(description)


HOSTILE_PIPELINE = """
import json, re, resource, sys, time
from pathlib import Path
import datasets, pyarrow  # imported before the baseline: their size is not the pipeline's
from llmbook import data as D
from llmbook.foundations import LICENSE_POLICY

stdlib, site, work, out = map(Path, sys.argv[1:])
rss_now_mb = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**20
started = time.perf_counter()
source = D.installation_source(stdlib_root=stdlib, distribution_paths=[site])
raw, acquisition, ingestion = D.ingest([source], 1e12, work, work / "manifest.jsonl")
licensed, l1 = D.license_step(raw, work, LICENSE_POLICY)
deduped, l2 = D.exact_dedup_step(licensed, work)
quality, l3 = D.quality_step(deduped, work)
near, l4 = D.near_dedup_step(quality, work)
private, l5 = D.privacy_step(near, work, D.load_blocklist())
ledgers = D.check_chain([acquisition, ingestion, l1, l2, l3, l4, l5])
out.write_text(json.dumps(dict(
    seconds=time.perf_counter() - started,
    rss_before_mb=rss_now_mb,
    # VmHWM, this process's own peak: ru_maxrss also keeps the parent's peak from before exec (Linux's exec_mmap)
    rss_peak_mb=int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) / 1024,
    ledgers=[vars(l) for l in ledgers],
    paths=list(raw["path"]),
    heldout=list(raw["heldout"]),
)))
"""


def test_a_hostile_installation_is_counted_not_crashed(tmp_path):
    stdlib, site, outside = tmp_path / "lib" / "python3", tmp_path / "site-packages", tmp_path / "outside" / "x.py"
    _build_hostile_stdlib(stdlib)
    description_bytes = _build_hostile_site_packages(site, outside)
    work, out = tmp_path / "work", tmp_path / "result.json"
    args = [sys.executable, "-c", HOSTILE_PIPELINE, str(stdlib), str(site), str(work), str(out)]
    child = subprocess.run(args, capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert child.returncode == 0, child.stderr[-4000:]
    result = json.loads(out.read_text())
    acquisition = result["ledgers"][0]
    dropped, paths = acquisition["dropped"], set(result["paths"])
    # names that are not UTF-8 (or hold control characters) are read, under a printable, escaped path
    assert {"caf\\xe9.py", "dir\\xff/inside.py", "new\\nline.py", "bell\\x07.py"} <= paths, paths
    assert "fractions.py" in paths and any(result["heldout"]) and "fine.py" in paths
    assert any(p.endswith("/depth10.py") for p in paths)
    # what cannot be read is dropped with its reason: never opened, followed, or read whole
    assert dropped["unreadable (not a regular file)"] == [2, 0]  # the two pipes
    assert dropped["unreadable (symbolic link (not followed))"][0] == 3
    assert dropped["unreadable (missing)"] == [1, 0]
    assert dropped["too large"] == [4, 2 * SPARSE_BYTES + ONE_LINE_BYTES + description_bytes]
    assert dropped["unreadable (directory not listed: File name too long)"][0] == 1  # the deep tree, past PATH_MAX
    assert dropped["unreadable (METADATA: not UTF-8)"][0] == 1
    assert dropped["unreadable (RECORD: not UTF-8)"][0] == dropped["unreadable (RECORD: malformed)"][0] == 1
    manifest = [json.loads(line) for line in (work / "manifest.jsonl").read_text().splitlines()]
    assert not any("outside" in m["path"] or m["path"].endswith("x.py") for m in manifest)
    assert all(m["sha256"] is None for m in manifest if m["status"] == "too large")
    # the ledgers balance (checked in the child, step by step) and the manifest lists every item once
    assert len(manifest) == acquisition["in_docs"] and sum(m["bytes"] for m in manifest) == acquisition["in_bytes"]
    rss = f"peak RSS {result['rss_peak_mb']:.0f} MB, {result['rss_before_mb']:.0f} MB before the pipeline"
    print(f"hostile installation: {result['seconds']:.1f} s, {rss}")
    assert result["rss_peak_mb"] - result["rss_before_mb"] < 256, result  # nothing large was read whole


def test_a_hostile_installation_listed_and_read_on_three_processes_is_the_same(tmp_path):
    stdlib, site = tmp_path / "lib" / "python3", tmp_path / "site-packages"
    _build_hostile_stdlib(stdlib)
    _build_hostile_site_packages(site, tmp_path / "outside" / "x.py")
    source = D.installation_source(stdlib_root=stdlib, distribution_paths=[site])
    where = lambda items: [(item.distribution, item.path, item.size) for item in items]
    listed = sorted((pair for listing in source.listings(3) for pair in D.keyed_items(listing)), key=lambda p: p[0])
    assert where(item for _, item in listed) == where(D.reading_order(source.items()))
    for budget in (1e12, 2000):  # everything; and a budget the first items fill, the workers at work past it
        runs = []
        for n in (1, 3):
            work = tmp_path / f"w{n}-{budget:g}"
            runs.append(D.ingest([D.expression_source(2), source], budget, work, work / "m.jsonl", num_proc=n))
        (one, *one_ledgers), (three, *three_ledgers) = runs
        assert one.to_list() == three.to_list() and len(one)
        assert [asdict(ledger) for ledger in one_ledgers] == [asdict(ledger) for ledger in three_ledgers]
        manifests = [(tmp_path / f"w{n}-{budget:g}" / "m.jsonl").read_bytes() for n in (1, 3)]
        assert manifests[0] == manifests[1]


def test_canaries_are_planted_in_the_training_split_and_counted(tmp_path):
    raw, _, _ = D.ingest([D.expression_source(2)], 1e6, tmp_path, tmp_path / "manifest.jsonl")
    canaries = D.make_canaries((1, 4), seed=3)
    assert sorted(c["repeats"] for c in canaries) == [0] * 3 + [1] * 3 + [4] * 3
    assert D.make_canaries((1, 4), seed=3) == canaries and D.make_canaries((), seed=3) == []
    planted, ledger = D.plant_canaries(raw, canaries)
    assert len(planted) == len(raw) + 15 == ledger.out_docs and ledger.in_docs == len(raw)
    train = D.split_parts(planted)["train"]["text"]
    assert sorted(t for t in train if "vault code" in t) == sorted(
        D.canary_text(c) for c in canaries for _ in range(c["repeats"])
    )
    with pytest.raises(ValueError, match="memorization_canaries"):
        make_preset("tiny", "memorization_canaries=1,x")


def test_a_source_from_a_jurisdiction_not_allowed_is_refused_unread(tmp_path):
    listed = []

    def items():
        listed.append(True)
        yield from ()

    foreign = D.Source("dir:abroad", "MIT", "text from elsewhere", items, jurisdiction="DE")
    sources = [D.expression_source(1), foreign]
    _, acquisition, _ = D.ingest(sources, 1e6, tmp_path, tmp_path / "manifest.jsonl", ("generated",))
    assert acquisition.counts["refused sources"] == {"dir:abroad": "DE"} and not listed
    lines = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert lines[-1]["status"].startswith("refused") and lines[0]["jurisdiction"] == "generated"
    assert D.hf_spec("docs/|CC-BY-4.0|FR") == ("docs/", "CC-BY-4.0", "FR") and D.hf_spec("x")[2] == "unknown"


def test_ingestion_on_two_processes_is_the_same(messy_corpus, tmp_path):
    c = messy_corpus
    sources = [D.directory_source(c["src"], "MIT"), D.hf_source(f"{c['hf']}|CC0-1.0")]
    runs = [D.ingest(sources, 1e12, tmp_path / f"w{n}", tmp_path / f"m{n}.jsonl", num_proc=n) for n in (1, 2)]
    (one, *one_ledgers), (two, *two_ledgers) = runs
    assert one.to_list() == two.to_list()
    assert [asdict(l) for l in one_ledgers] == [asdict(l) for l in two_ledgers]
    assert (tmp_path / "m1.jsonl").read_bytes() == (tmp_path / "m2.jsonl").read_bytes()


STOPPED_EARLY = """
from llmbook.data import forked_pool, in_order
for attempt in range(8):
    with forked_pool(2) as pool:  # left as ingestion leaves it once its budget is spent
        for task, result in in_order(bytes, [8 << 20] * 20, pool, ahead=8):
            break
"""
STOPPED_BY_AN_ERROR = """
import multiprocessing
from llmbook.data import forked_pool, in_order
for attempt in range(8):
    try:
        with forked_pool(2) as pool:  # an error in the reader's loop, as results are on their way
            for task, result in in_order(bytes, [8 << 20] * 20, pool, ahead=8):
                raise ValueError(attempt)
    except ValueError:
        assert not multiprocessing.active_children(), "a worker outlived its pool"
"""


def test_a_pool_left_while_results_are_on_their_way_does_not_hang():
    # a pool's own exit terminated the workers, one of them while it sent 8 MB back holding the results queue's lock:
    # one exit in three hung for ever, before `forked_pool` made a `WaitingPool`
    child = subprocess.run([sys.executable, "-c", STOPPED_EARLY], capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr[-4000:]
    # and `Pool.terminate`, which an error's exit calls, hung 12 times in 30: now it has STOP_SECONDS, then the
    # workers die
    child = subprocess.run([sys.executable, "-c", STOPPED_BY_AN_ERROR], capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr[-4000:]
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt), D.forked_pool(2) as pool:  # an interrupt does not wait for the work
        pool.apply_async(time.sleep, (60,))
        raise KeyboardInterrupt
    assert time.perf_counter() - started < 30


def test_the_thread_that_keeps_a_pools_workers_sleeps_while_results_come_back(monkeypatch):
    # `Pool`'s wakes whenever a result waits to be read, and spins until it is: once per result at least
    wakeups = []
    wait = multiprocessing.pool.Pool._wait_for_updates

    def counted_wait(*args, **kwargs):
        wakeups.append(1)
        return wait(*args, **kwargs)

    monkeypatch.setattr(multiprocessing.pool.Pool, "_wait_for_updates", staticmethod(counted_wait))
    with D.forked_pool(2) as pool:
        results = [len(result) for _, result in D.in_order(bytes, [1 << 20] * 40, pool, ahead=8)]
    assert results == [1 << 20] * 40
    assert len(wakeups) < 10, len(wakeups)


def planted_cases(rows: list[dict], seed: int = 0) -> list[dict]:
    "Rows with cases that reach every branch of the five steps scattered through them."
    rng = random.Random(seed)
    good = [r for r in rows if 2000 < len(r["text"]) < 50_000 and not D.quality_reason(r["text"], r["domain"])]
    picks = rng.sample(good, 40)
    for r in picks[:8]:
        r["heldout"] = True
    planted = [dict(r, id=r["id"] + "+ws", text=r["text"].replace("\n", " \n", 5), heldout=False) for r in picks[:16]]
    for r in picks[4:24]:  # one word in a hundred changed: near duplicates
        words = r["text"].split(" ")
        for i in rng.sample(range(len(words)), len(words) // 100 + 1):
            words[i] = "zq" + words[i]
        planted.append(dict(r, id=r["id"] + "+near", text=" ".join(words), heldout=False))
    planted += [dict(r, id=r["id"] + "+gpl", license="GPL-3.0-only") for r in picks[24:28]]
    unsafe, pii = D.shipped_jsonl("unsafe_planted.jsonl"), D.shipped_jsonl("pii_planted.jsonl")
    filler = "This paragraph says how the project is organised and where its maintainers can be reached."
    for n, lines in enumerate([unsafe[i : i + 3] for i in range(0, 30, 3)] + [pii[i : i + 6] for i in range(0, 66, 6)]):
        text = "\n".join([filler] + [line["text"] for line in lines])
        planted.append(dict(picks[30], id=f"planted-{n}", text=text, kind="txt", domain="prose", heldout=n % 4 == 0))
    for r in planted:
        rows.insert(rng.randrange(len(rows) + 1), r)
    return rows


def test_two_processes_and_datatrove_keep_what_one_process_keeps(tmp_path):
    "License → privacy & safety on 1 and 2 processes and as a datatrove pipeline (2 tasks): same rows, same ledgers."
    from llmbook.foundations import LICENSE_POLICY

    cfg = make_preset("tiny")
    raw, _, _ = D.ingest(D.catalog(cfg), 2e6, tmp_path / "raw", tmp_path / "m.jsonl")
    writer = D.ShardWriter(tmp_path / "planted", shard_bytes=1 << 20)
    for row in planted_cases(raw.to_list()):
        writer.write(row)
    corpus, blocklist = writer.finish(), D.load_blocklist()

    def steps(num_proc):
        work = tmp_path / f"steps-{num_proc}"
        licensed, l1 = D.license_step(corpus, work, LICENSE_POLICY, num_proc)
        deduped, l2 = D.exact_dedup_step(licensed, work, num_proc)
        quality, l3 = D.quality_step(deduped, work, num_proc)
        near, l4 = D.near_dedup_step(quality, work, num_proc)
        private, l5 = D.privacy_step(near, work, blocklist, num_proc)
        return private.to_list(), [asdict(l) for l in (l1, l2, l3, l4, l5)]

    one, two = steps(1), steps(2)
    kept, ledgers = D.datatrove_pipeline(writer.files, tmp_path / "engine", LICENSE_POLICY, blocklist, 2, 2)
    assert one == two == (kept.to_list(), [asdict(l) for l in ledgers])
    reasons = {reason for ledger in one[1] for reason in ledger["dropped"]}
    for reason in ("license GPL-3.0-only", "exact duplicate", "exact duplicate of a held-out document"):
        assert reason in reasons
    assert {"near duplicate", "near duplicate of a held-out document"} <= reasons
    assert any(r.startswith("unsafe") for r in reasons) and len(one[1][4]["counts"]["replaced"]) >= 4


def test_taken_rows_is_take_chunk_by_chunk():
    "The same rows as Arrow's take, in the order asked, from a table of many chunks (without joining them first)."
    import pyarrow as pa

    table = pa.concat_tables([pa.table({"n": np.arange(c * 100, c * 100 + 100)}) for c in range(30)])
    rows = np.random.default_rng(0).choice(len(table), 500, replace=False)
    assert D.taken_rows(table, rows).equals(table.take(rows))
    assert D.taken_rows(table, rows)["n"].to_pylist() == rows.tolist()
    assert D.taken_rows(table, np.zeros(0, np.int64)).num_rows == 0
