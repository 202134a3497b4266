"Unit tests of llmbook.book: presets, atomic writes, digests, the run directory, stamps, report, CLI."

import json
import sys

import pytest
import torch

from llmbook import book
from llmbook.book import (
    CHAPTERS,
    PRESETS,
    ArtifactError,
    Chapter,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    chapter_status,
    load_json,
    load_safetensors,
    main,
    make_preset,
    open_chapter,
    open_run,
    parse_overrides,
    read_stamp,
    save_safetensors,
    sha256_tree,
    start_chapter,
    write_report,
)

TOY = (Chapter(1, "toy_a", "Toy A", "01_toy_a", ("a.txt",)), Chapter(2, "toy_b", "Toy B", "02_toy_b", ("b",)))


def test_presets_are_typed_and_overridable():
    assert list(PRESETS) == ["tiny", "cpu", "gpu", "multi-gpu"]
    cfg = make_preset("gpu", {"depth": "8", "compile": "no", "data_mb": "1.5", "hf_datasets": "a,b"})
    assert (cfg.depth, cfg.compile, cfg.data_mb, cfg.device) == (8, False, 1.5, "cuda")
    assert parse_overrides("depth=2 hf_datasets=a,b") == {"depth": "2", "hf_datasets": "a,b"}
    assert PRESETS["tiny"].depth < PRESETS["cpu"].depth < PRESETS["gpu"].depth < PRESETS["multi-gpu"].depth


@pytest.mark.parametrize(
    "overrides, message",
    [
        ("depht=3", "did you mean 'depth'"),
        ("depth", "not of the form key=value"),
        ("depth=2.5", "expected int"),
        ("compile=maybe", "expected bool"),
        ("precision=fp8", "is not one of"),
        ("seq_len=-1", "must be positive"),
        ("name=x", "not a preset field"),
    ],
)
def test_bad_overrides_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_preset("tiny", overrides)


def test_atomic_write_keeps_old_content_on_failure(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("{")
            raise RuntimeError("crash")
    assert load_json(target) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_atomic_directory_replacement(tmp_path):
    target = tmp_path / "shard"
    for content in ("old", "new"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "part-0").write_text(content)
    assert (target / "part-0").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["shard"]


def test_json_refuses_nan_and_names_file(tmp_path):
    with pytest.raises(ValueError, match="bad.json"):
        atomic_write_json(tmp_path / "bad.json", {"x": float("inf")})
    assert not (tmp_path / "bad.json").exists()


def test_loaders_refuse_corrupt_files(tmp_path):
    digest = save_safetensors({"w": torch.ones(3)}, tmp_path / "w.safetensors")
    assert load_safetensors(tmp_path / "w.safetensors", digest)["w"].tolist() == [1.0, 1.0, 1.0]
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[:-2] + b"xx")
    with pytest.raises(ArtifactError, match="changed or is corrupt"):
        load_safetensors(tmp_path / "w.safetensors", digest)
    (tmp_path / "t.json").write_text('{"a": [1, 2')
    with pytest.raises(ArtifactError, match="t.json is not valid JSON"):
        load_json(tmp_path / "t.json")


def test_sha256_tree_is_order_free_and_content_sensitive(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1").write_text("x")
    (tmp_path / "a" / "2").write_text("y")
    first = sha256_tree(tmp_path / "a")
    (tmp_path / "a" / "2").write_text("z")
    assert sha256_tree(tmp_path / "a") != first


def test_run_dir_contract(tmp_path):
    run = open_run("tiny", tmp_path, "seq_len=32")
    assert load_json(run.config_json)["overrides"] == {"seq_len": "32"}
    assert run.artifact("eval/base.json") == run.path / "eval/base.json"
    with pytest.raises(ValueError, match="not an artifact"):
        run.artifact("evals/base.json")
    with pytest.raises(ValueError, match="made with preset 'tiny'"):
        open_run("cpu", tmp_path)
    outputs = [o for c in CHAPTERS for o in c.outputs]
    assert len(outputs) == len(set(outputs))


def test_stamps_follow_inputs_and_outputs(tmp_path):
    a = open_chapter(1, "tiny", tmp_path, book=TOY)
    with pytest.raises(ArtifactError, match="did not write a.txt"):
        a.finish()
    atomic_write_text(a.artifact("a.txt"), "1")
    a.finish()
    assert chapter_status(a, TOY[0])[0]
    b = open_chapter(2, "tiny", tmp_path, book=TOY)
    (b.path / "b").mkdir()
    (b.path / "b" / "f").write_text("2")
    b.finish()
    assert chapter_status(b, TOY[1])[0]
    assert load_json(b.manifest_json)["b/f"]["chapter"] == 2
    # an earlier chapter's new output makes the later one stale
    a = open_chapter(1, "tiny", tmp_path, book=TOY)
    atomic_write_text(a.artifact("a.txt"), "changed")
    a.finish()
    assert chapter_status(b, TOY[1]) == (False, "the outputs of 01_toy_a changed")
    # a chapter that starts and is killed before finishing has no stamp
    start_chapter(b)
    assert read_stamp(b, TOY[1]) is None and "b/f" not in load_json(b.manifest_json)
    # a hand-edited or corrupt stamp counts as no stamp
    a.path.joinpath("stamps", "01_toy_a.json").write_text("{")
    assert chapter_status(a, TOY[0]) == (False, "not run yet")


def test_read_json_checks_the_manifest(tmp_path):
    run = open_chapter(1, "tiny", tmp_path, book=(Chapter(1, "toy", "Toy", "01_toy", ("x.json",)),))
    atomic_write_json(run.artifact("x.json"), {"a": 1})
    run.finish()
    assert run.read_json("x.json") == {"a": 1}
    (run.path / "x.json").write_text('{"a": 2}')
    with pytest.raises(ArtifactError, match="changed or is corrupt"):
        run.read_json("x.json")


def test_chapter_opened_alone_runs_its_prerequisites_notebooks(tmp_path):
    run = open_chapter(2, "tiny", tmp_path)  # chapter 2 in an empty run directory
    stamp = read_stamp(run, CHAPTERS[0])
    assert stamp["how"] == "papermill" and (run.notebooks_dir / "01_foundations.ipynb").exists()
    assert set(stamp["outputs"]) == {"spec.json", "risks.json", "budget.json"}
    assert run.read_json("budget.json")["preset"] == "tiny"
    run = open_chapter(2, "tiny", tmp_path)  # now fresh: not run again
    assert read_stamp(run, CHAPTERS[0])["finished_at"] == stamp["finished_at"]


def test_report_card_scores_targets(tmp_path):
    run = open_chapter(1, "tiny", tmp_path, book=TOY)
    spec = {
        "metrics": [
            {"name": "tokens", "chapter": 1, "direction": "at_least", "targets": {"tiny": 3}},
            {"name": "loss", "chapter": 2, "direction": "at_most", "targets": {"tiny": 1.0}},
            {"name": "gain", "chapter": 1, "direction": "at_least", "targets": {"tiny": 0.1}},
        ]
    }
    spec["metrics"] = [dict(m, unit="", why="test") for m in spec["metrics"]]
    atomic_write_json(run.path / "spec.json", spec)
    atomic_write_text(run.artifact("a.txt"), "x")
    run.record(tokens=4)
    assert run.target("gain", 0.04) == "not met"  # a missed target is recorded, not raised
    run.finish()
    md, html = write_report(run)
    text = md.read_text()
    assert "| tokens | 1 | ≥ 3 | 4 | met | +1 |" in text
    assert "| loss | 2 | ≤ 1 | — | not measured yet | — |" in text
    assert "| gain | 1 | ≥ 0.1 | 0.04 | not met | -0.06 |" in text
    assert "<td>met</td>" in html.read_text()
    missed = book.missed_targets(run)
    assert [row[0] for row in missed] == ["gain"]
    assert "1 met, 1 not met" in book.targets_summary(run, missed)
    with pytest.raises(ValueError, match="not a success metric"):
        run.target("unknown", 1.0)


def test_kernel_runs_this_interpreter(tmp_path, monkeypatch):
    # a user-registered kernel called python3 pointing elsewhere must not matter
    fake = tmp_path / "kernels" / "python3"
    fake.mkdir(parents=True)
    (fake / "kernel.json").write_text(
        json.dumps(
            {"argv": ["/usr/bin/false", "-f", "{connection_file}"], "display_name": "elsewhere", "language": "python"}
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.setattr(book, "_KERNEL_DIR", None)
    from jupyter_client.kernelspec import KernelSpecManager

    assert KernelSpecManager().get_kernel_spec(book.kernel_for_this_python()).argv[0] == sys.executable


def test_cli(tmp_path, capsys):
    assert main(["presets"]) == 0
    assert "multi-gpu" in capsys.readouterr().out
    assert main(["status", "--run-dir", str(tmp_path), "--set", "depth=x"]) == 2
    assert "depth='x': expected int" in capsys.readouterr().err
    assert main(["status", "--run-dir", str(tmp_path)]) == 0
    assert "Chapter 1 (Foundations): to run (not run yet)" in capsys.readouterr().out


def test_gpu_preset_without_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        book.torch_device(PRESETS["gpu"])


def test_dataset_paths_become_absolute(tmp_path, monkeypatch):
    "Local datasets named on the command line still resolve in nbs/, where the notebooks run; names stay names."
    monkeypatch.chdir(tmp_path)
    (tmp_path / "de.jsonl").write_text('{"text": "Satz"}\n')
    (tmp_path / "sympy").mkdir()  # a directory named like a distribution: a domain entry without hf: stays a name
    absolute = book._absolute_dataset_paths
    assert absolute("hf_datasets=de.jsonl|MIT") == f"hf_datasets={tmp_path / 'de.jsonl'}|MIT"
    assert absolute("domain=sympy,hf:de.jsonl|CC0-1.0") == f"domain=sympy,hf:{tmp_path / 'de.jsonl'}|CC0-1.0"
    assert absolute("domain=hf:org/name:config|MIT") == "domain=hf:org/name:config|MIT"
    assert absolute("depth=2") == "depth=2"
