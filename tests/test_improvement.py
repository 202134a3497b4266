"Chapter 9: an incremental refresh, the drift test, the archive and its verification, retiring a version."

import httpx
import numpy as np
import pytest
from scipy import stats

from llmbook.data import Source, tree_items
from llmbook.deployment import chat_prompt, make_app
from llmbook.modeling import BPETokenizer
from serving import ScriptedModel


def snapshot(root, version):
    return Source("toy", "MIT", "a toy installation", lambda: tree_items("toy", "toy-dist", version, root, "MIT"))


def write_files(root, texts):
    for name, text in texts.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_a_refresh_reads_only_what_is_new_and_filters_only_what_changed(tmp_path):
    from llmbook.improvement import incremental_ingest, refresh_state

    root = tmp_path / "site"
    text = lambda n: f'def f{n}(x):\n    """Return x plus {n}, for the test number {n}."""\n    return x + {n}\n'
    write_files(root, {f"pkg/m{n}.py": text(n) for n in range(4)})
    first, *ledgers, counts = incremental_ingest([snapshot(root, "1.0")], {}, tmp_path / "w1", tmp_path / "m1.jsonl")
    assert counts == {"new": 4} and all(ledger.check() for ledger in ledgers)
    state = refresh_state([tmp_path / "m1.jsonl"])
    again, *_, counts = incremental_ingest([snapshot(root, "1.0")], state, tmp_path / "w2", tmp_path / "m2.jsonl")
    assert len(again) == 0 and counts == {"known: not read": 4}
    write_files(root, {"pkg/m0.py": text(0) + "\n\ndef g():\n    return 0\n", "pkg/new.py": text(9)})
    upgraded, acquisition, ingestion, counts = incremental_ingest(
        [snapshot(root, "1.1")], state, tmp_path / "w3", tmp_path / "m3.jsonl"
    )
    assert counts == {"new": 1, "changed": 1, "upgraded, bytes unchanged: not filtered": 3}
    assert ingestion.dropped["unchanged since the last snapshot"][0] == 3
    assert sorted(set(upgraded["path"])) == ["pkg/m0.py", "pkg/new.py"]


def test_the_drift_test_matches_scipy_and_keeps_its_false_alarm_rate():
    from llmbook.improvement import DRIFT_ALPHA, drifted, ks_statistic

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=200), rng.normal(0.5, 1, size=50)
    assert ks_statistic(a, b) == pytest.approx(stats.ks_2samp(a, b).statistic, abs=1e-12)
    alarms = sum(drifted(rng.normal(size=200), rng.normal(size=50))[0] for _ in range(500))
    assert alarms <= 500 * DRIFT_ALPHA + 3 * np.sqrt(500 * DRIFT_ALPHA), alarms  # about α, not more
    shifted = sum(drifted(rng.normal(size=200), rng.normal(1.0, 1, size=50))[0] for _ in range(100))
    assert shifted >= 95, shifted


def test_the_archive_stores_by_content_and_names_a_damaged_or_missing_file(tmp_path):
    from llmbook.improvement import archive_command, archive_release, restore, verify_archive

    files = {"weights.bin": b"w" * 100, "card/README.md": b"# card", "copy/README.md": b"# card"}
    write_files(tmp_path / "release", {k: v.decode() for k, v in files.items()})
    archive = tmp_path / "archive"
    index = archive_release(archive, "toy-1.0.0", {k: tmp_path / "release" / k for k in files}, dict(version="1.0.0"))
    assert verify_archive(archive) == [] and archive_command("verify", archive) == 0
    assert len(list((archive / "objects").rglob("*.*"))) == 0 and len(index["files"]) == 3
    assert sum(p.is_file() for p in (archive / "objects").rglob("*")) == 2  # equal files stored once
    restored = restore(archive, index, "card", tmp_path / "back")
    assert (restored / "README.md").read_bytes() == b"# card"
    digest = index["files"]["weights.bin"]["sha256"]
    stored = archive / "objects" / digest[:2] / digest
    stored.chmod(0o644)
    stored.write_bytes(b"w" * 99 + b"x")
    assert verify_archive(archive) == [f"weights.bin: its object {stored} is damaged (its sha256 is not its name)"]
    assert archive_command("verify", archive) == 1
    stored.unlink()
    assert verify_archive(archive) == [f"weights.bin: its object {stored} is missing"]
    (archive / "releases" / "toy-1.0.0.json").write_text("{}")
    assert "the index is missing or damaged" in verify_archive(archive)[0]


def test_a_retired_version_is_refused_by_name_with_its_successor_and_kept_in_the_archive(tmp_path, serving):
    from llmbook.governance import Registry
    from llmbook.improvement import archive_release, retire, retirement_notice, stock_serving_store

    tokenizer = BPETokenizer([])
    asked = [dict(role="user", content="hello")]
    start, end = len(chat_prompt(tokenizer, dict(messages=asked))), tokenizer.special_tokens["<|end|>"]
    model = ScriptedModel(tokenizer.vocab_size, [*tokenizer.encode_ordinary("hi"), end], start)
    registry, store = Registry(tmp_path / "registry.db"), tmp_path / "store"
    for version in ("1.0.0", "1.1.0"):
        write_files(tmp_path / version, {"model.safetensors": f"weights of {version}"})
        registry.register("toy", version, tmp_path / version, {}, {}, "c", {}, "me", "test")
        registry.move("toy", version, "staging", "me", "test")
        registry.move("toy", version, "production", "me", "test")
    stock_serving_store(registry, "toy", store)
    files = {f"versions/{v}/model.safetensors": tmp_path / v / "model.safetensors" for v in ("1.0.0", "1.1.0")}
    index = archive_release(tmp_path / "archive", "toy", files, {})
    with pytest.raises(ValueError, match="may become"):  # production cannot be retired: deprecate it first
        retire(registry, "toy", "1.1.0", store, index, "me", "too soon")
    with pytest.raises(Exception, match="not archived whole"):
        retire(registry, "toy", "1.0.0", store, dict(files={}), "me", "no archive")
    assert registry.get("toy", "1.0.0")["stage"] == "deprecated" and (store / "toy" / "1.0.0").is_dir()
    retire(registry, "toy", "1.0.0", store, index, "me", "superseded")
    assert not (store / "toy" / "1.0.0").exists() and (tmp_path / "1.0.0" / "model.safetensors").is_file()
    app = make_app(
        lambda name: (model, tokenizer), "toy@1.1.0", alias="toy", retired=retirement_notice(registry, "toy")
    )
    url = serving(app)
    ask = lambda name: httpx.post(f"{url}/v1/chat/completions", json=dict(model=name, messages=asked))
    refused, unknown, served = ask("toy@1.0.0"), ask("toy@9.9.9"), ask("toy")
    assert refused.status_code == 410 and refused.json()["error"]["code"] == "model_retired"
    assert "use toy@1.1.0" in refused.json()["error"]["message"] and "superseded" in refused.json()["error"]["message"]
    assert unknown.status_code == 404 and served.status_code == 200
    assert registry.events("toy")[-1] | dict(at=None, id=None) == dict(
        id=None,
        name="toy",
        version="1.0.0",
        before="deprecated",
        after="retired",
        actor="me",
        reason="superseded",
        at=None,
    )
