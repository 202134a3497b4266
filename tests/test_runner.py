"The papermill runner: failures name chapter and cell, reruns skip finished chapters, killed runs resume."

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from llmbook.book import ChapterFailed, open_run, read_stamp, run_book
from toy import TOY_BOOK, write_toy_book

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def toy_nbs(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMBOOK_NBS", str(tmp_path / "nbs"))
    return tmp_path / "nbs"


def test_failure_names_chapter_and_cell_then_resumes(tmp_path, toy_nbs):
    write_toy_book(toy_nbs, 'assert 1 + 1 == 3, "planted failure"')
    run = open_run("tiny", tmp_path / "run", book=TOY_BOOK)
    with pytest.raises(ChapterFailed) as failure:
        run_book(run, progress=False)
    e = failure.value
    assert (e.chapter.number, e.cell) == (2, 5) and e.notebook == run.notebooks_dir / "02_toy_b.ipynb"
    assert "Chapter 2 (Toy B) failed in cell 5" in str(e) and "AssertionError: planted failure" in str(e)
    assert "line 1 assert 1 + 1 == 3" in str(e) and e.notebook.exists()
    assert read_stamp(run, TOY_BOOK[0]) is not None and read_stamp(run, TOY_BOOK[1]) is None
    write_toy_book(toy_nbs)  # fixed
    assert [o["status"] for o in run_book(run, progress=False)] == ["skipped", "ran"]
    assert [o["status"] for o in run_book(run, progress=False)] == ["skipped", "skipped"]
    assert [o["status"] for o in run_book(run, progress=False, start=2)] == ["ran"]
    assert "| 2 Toy B | finished |" in run.report_md.read_text()


def test_killed_run_resumes_where_it_stopped(tmp_path, toy_nbs):
    go = tmp_path / "go"
    write_toy_book(toy_nbs, f"import time\nwhile not __import__('pathlib').Path({str(go)!r}).exists(): time.sleep(0.2)")
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); from toy import TOY_BOOK; from llmbook.book import *; "
        "run_book(open_run('tiny', sys.argv[2], book=TOY_BOOK), progress=False)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(Path(__file__).parent), str(tmp_path / "run")],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    executed = tmp_path / "run" / "notebooks" / "02_toy_b.ipynb"
    deadline = time.time() + 120
    while not executed.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert executed.exists(), "chapter 2 never started"
    os.killpg(proc.pid, signal.SIGKILL)  # the runner, mid-chapter, with no chance to clean up
    proc.wait()
    time.sleep(2)  # an orphaned kernel notices its parent is gone and exits
    run = open_run("tiny", tmp_path / "run", book=TOY_BOOK)
    assert read_stamp(run, TOY_BOOK[0]) is not None and read_stamp(run, TOY_BOOK[1]) is None
    go.touch()
    assert [o["status"] for o in run_book(run, progress=False)] == ["skipped", "ran"]
    assert (run.path / "b.txt").read_text() == "3"


def test_cli_exits_nonzero_naming_chapter_and_cell(tmp_path):
    """The real Chapter 1 with a planted failing cell, through the `llmbook` command."""
    nb = nbformat.read(ROOT / "nbs" / "01_foundations.ipynb", as_version=4)
    opened = next(i for i, c in enumerate(nb.cells) if "open_chapter(1" in c.source)
    nb.cells.insert(opened + 1, nbformat.v4.new_code_cell('assert cfg.name == "huge", "planted failure"'))
    (tmp_path / "nbs").mkdir()
    nbformat.write(nb, tmp_path / "nbs" / "01_foundations.ipynb")
    env = {**os.environ, "LLMBOOK_NBS": str(tmp_path / "nbs")}
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "llmbook"),
            "run",
            "--preset",
            "tiny",
            "--run-dir",
            str(tmp_path / "run"),
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stderr
    cell = opened + 2 + 1  # 1-based, after papermill's injected-parameters cell
    assert f"Chapter 1 (Foundations) failed in cell {cell}" in result.stderr, result.stderr
    assert "AssertionError: planted failure" in result.stderr
    assert str(tmp_path / "run" / "notebooks" / "01_foundations.ipynb") in result.stderr


def test_only_runs_missing_earlier_chapters_first(tmp_path, toy_nbs):
    write_toy_book(toy_nbs)
    run = open_run("tiny", tmp_path / "run", book=TOY_BOOK)
    assert [o["chapter"] for o in run_book(run, only=2, progress=False)] == [2]
    assert read_stamp(run, TOY_BOOK[0])["how"] == "papermill"  # chapter 1 ran first, through the runner
    assert (run.path / "b.txt").read_text() == "3"


def test_strict_exits_nonzero_on_a_missed_target_and_plain_run_does_not(tmp_path):
    """A stand-in Chapter 1 that writes a spec with one target and misses it: the run finishes either way."""
    from llmbook.book import CHAPTERS, chapter_notebook

    body = [
        "metric = dict(name='gain', chapter=1, unit='', direction='at_least', targets={'tiny': 0.5}, why='test')\n"
        "atomic_write_json(run.artifact('spec.json'), dict(metrics=[metric]))\n"
        "for name in ('risks.json', 'budget.json'):\n"
        "    atomic_write_json(run.artifact(name), {})",
        "run.target('gain', 0.25)",
    ]
    (tmp_path / "nbs").mkdir()
    nbformat.write(chapter_notebook(CHAPTERS[0], body), tmp_path / "nbs" / "01_foundations.ipynb")
    env = {**os.environ, "LLMBOOK_NBS": str(tmp_path / "nbs")}
    command = [str(Path(sys.executable).parent / "llmbook"), "run", "--run-dir", str(tmp_path / "run"), "--no-progress"]
    plain = subprocess.run(command, env=env, capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr
    assert "targets at tiny: 0 met, 1 not met" in plain.stdout and "not met: gain (Chapter 1)" in plain.stdout
    strict = subprocess.run(command + ["--strict"], env=env, capture_output=True, text=True)
    assert strict.returncode == 3, strict.stdout + strict.stderr


def test_site_renders_executed_chapters_with_navigation(tmp_path, toy_nbs, monkeypatch):
    """Stand-ins for Chapters 1 and 2 run at `cpu`, Chapter 3 is written but not run: `llmbook site` makes the book."""
    from llmbook.book import CHAPTERS, chapter_notebook, main

    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel shows figures inline, as under `make book`
    first = [
        "atomic_write_json(run.artifact('spec.json'), dict(metrics=[]))\n"
        "for name in ('risks.json', 'budget.json'):\n"
        "    atomic_write_json(run.artifact(name), {})",
        "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([1, 2], [3, 4]);",
    ]
    second = ["run.artifact('data').mkdir()\natomic_write_json(run.artifact('data_report.json'), {})"]
    toy_nbs.mkdir()
    for chapter, body in zip(CHAPTERS, (first, second, [])):
        nbformat.write(chapter_notebook(chapter, body), toy_nbs / f"{chapter.notebook}.ipynb")
    run = open_run("cpu", tmp_path / "run")
    run_book(run, only=2, progress=False)  # Chapter 1 first, then 2; Chapter 3 is not run
    assert main(["site", "--run-dir", str(run.path)]) == 0  # the preset is the run directory's
    site = run.path / "site"
    assert sorted(p.name for p in site.iterdir()) == [
        "01_foundations.html",
        "02_data.html",
        "index.html",
        "report.html",
    ]
    contents = (site / "index.html").read_text()
    assert 'href="01_foundations.html"' in contents and 'href="02_data.html"' in contents
    assert "Chapter 3 — Modeling <em>(not run)</em>" in contents and 'href="03_modeling.html"' not in contents
    assert 'href="report.html"' in contents and "preset cpu" in contents
    foundations, data = (site / "01_foundations.html").read_text(), (site / "02_data.html").read_text()
    assert foundations.count('href="02_data.html"') == 2 and foundations.count('href="index.html"') == 2
    assert data.count('href="01_foundations.html"') == 2 and "llmbook-next" not in data
    assert "data:image/png;base64," in foundations  # the plot, embedded
    assert (site / "report.html").read_text() == run.report_html.read_text()
    assert main(["site", "--run-dir", str(tmp_path / "empty")]) == 2  # nothing executed: an error, no site
