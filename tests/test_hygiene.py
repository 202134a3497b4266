"""Hygiene: notebooks are the source (export and clean change nothing), the README is rendered from the
front page, the import graph follows the book's order, and the pins that keep nbdev 2 working are in place."""

import ast
import configparser
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import papermill

from llmbook.book import CHAPTERS

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def snapshot():
    files = [*(ROOT / "nbs").glob("*.ipynb"), *(ROOT / "llmbook").glob("*.py"), ROOT / "pyproject.toml"]
    return {str(p.relative_to(ROOT)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_export_and_clean_change_nothing():
    before = snapshot()
    for tool in ("nbdev_export", "nbdev_clean"):
        subprocess.run([str(BIN / tool)], cwd=ROOT, check=True, capture_output=True)
    after = snapshot()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"run `make export` and commit: {changed}"


def test_readme_is_rendered_from_index():
    result = subprocess.run([str(BIN / "llmbook"), "readme", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    readme = (ROOT / "README.md").read_text()
    assert readme.index("make book") < readme.index("## ") and readme.index("make test") < readme.index("## ")


def test_one_notebook_per_module():
    exported = {}
    for nb in (ROOT / "nbs").glob("*.ipynb"):
        for cell in json.loads(nb.read_text())["cells"]:
            if m := re.search(r"^#\|\s*default_exp\s+(\S+)", "".join(cell["source"]), re.M):
                exported[m.group(1)] = nb.stem
    modules = {p.stem for p in (ROOT / "llmbook").glob("*.py")} - {"__init__", "_modidx"}
    assert modules == set(exported), "every module comes from exactly one notebook"
    for chapter in CHAPTERS:
        if chapter.slug in exported:
            assert exported[chapter.slug] == chapter.notebook


def test_import_graph_follows_the_book():
    order = {"book": 0, **{c.slug: c.number for c in CHAPTERS}}
    for path in (ROOT / "llmbook").glob("*.py"):
        if path.stem not in order:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module]
                if isinstance(node, ast.ImportFrom) and node.module
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            for name in names:
                if name.startswith("llmbook."):
                    imported = name.split(".")[1]
                    assert order[imported] < order[path.stem], f"{path.stem} imports {imported}, a later chapter"


def test_chapter_notebooks_take_papermill_parameters_and_finish():
    for chapter in CHAPTERS:
        path = ROOT / "nbs" / f"{chapter.notebook}.ipynb"
        if not path.exists():
            continue
        cells = json.loads(path.read_text())["cells"]
        tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: one cell tagged `parameters`"
        assert set(papermill.inspect_notebook(str(path))) == {"preset", "run_dir", "overrides"}, path.name
        code = [c for c in cells if c["cell_type"] == "code"]
        assert "".join(code[-1]["source"]).strip().startswith("run.finish()"), f"{path.name} must end with run.finish()"
        assert all(not c.get("outputs") for c in code), f"{path.name} has outputs: run nbdev_clean"


def test_pins():
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini")
    settings = cfg["DEFAULT"]
    assert settings["allowed_cell_metadata_keys"].strip() == "tags"
    requirements = settings["requirements"].split()
    assert {"nbdev>=2.4.14,<3", "fastcore<2", "execnb<0.2"} <= set(requirements)
    constraints = (ROOT / "constraints.txt").read_text().split()
    assert "torch==2.13.0" in constraints
    pinned = {re.split(r"[=<>]", line)[0].lower() for line in constraints if "==" in line}
    for requirement in requirements:
        assert re.split(r"[=<>]", requirement)[0].lower() in pinned, f"{requirement} is not pinned in constraints.txt"


def test_one_statement_per_line_and_lines_a_reader_can_hold():
    "ruff on nbs/, tests/ and bench/: the rules in pyproject.toml (line length, one statement per line), formatting."
    for args in (["check"], ["format", "--check"]):
        result = subprocess.run(
            [str(BIN / "ruff"), *args, "nbs", "tests", "bench"], cwd=ROOT, capture_output=True, text=True
        )
        assert result.returncode == 0, f"ruff {' '.join(args)}:\n{result.stdout}{result.stderr}"
