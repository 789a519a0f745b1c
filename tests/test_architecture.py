"""The code's architecture holds: imports point down the layers of `.importlinter`, no module
imports another's private names, and every DVC stage depends on all the code it runs."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

# The module each stage's command runs (`flam <command>` parses its arguments in flam_core.cli
# and calls this module's stage function). The CLI itself is left out of the stages' deps: it
# holds no stage logic, and listing it would re-run the whole pipeline for any new subcommand.
STAGE_ENTRIES = {
    "sources": "flam_core.data.sources",
    "recipes": "flam_core.data.recipes",
    "shards": "flam_core.data.shards",
    "validate": "flam_core.data.validate",
    "features": "flam_core.features",
    "train": "flam_core.train",
    "calibrate": "flam_core.calibrate",
    "evaluate": "flam_core.evaluation.report",
    "test_real": "flam_core.data.realset",
    "register": "flam_core.registry",
    "monitor": "flam_core.monitor",
}
# What a stage's code reads from the package besides modules, which the import graph cannot
# show: the template `results_markdown` renders results.md from.
STAGE_DATA = {"evaluate": {Path("flam_core/evaluation/templates")}}


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(root / ".importlinter")],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_contracts_are_kept():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_planted_upward_import_breaks_the_contract(tmp_path):
    for package in ("flam_core", "components", "pipelines"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path)
    errors = tmp_path / "flam_core" / "errors.py"
    errors.write_text(
        errors.read_text() + "\nimport flam_core.model.folder  # the lowest layer reaching up\n"
    )
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
    assert "flam_core.errors -> flam_core.model.folder" in result.stdout


def _python_files() -> list[Path]:
    return [
        path
        for folder in ("flam_core", "components", "pipelines", "bench", "tests", "scripts")
        for path in sorted((ROOT / folder).rglob("*.py"))
    ]


def test_no_module_imports_another_modules_private_names():
    found = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flam_core"):
                found += [
                    f"{path.relative_to(ROOT)}:{node.lineno} {node.module}.{alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_")
                ]
    assert not found, "private names imported across modules:\n" + "\n".join(found)


def _module_file(module: str) -> Path:
    path = ROOT / Path(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def stage_code(graph: grimp.ImportGraph, entry: str) -> set[Path]:
    """Files (relative to the repository) of `entry` and every flam_core module it imports,
    directly or not, lazily inside functions included, with the packages' `__init__.py` that
    importing them runs (those holding only a docstring left out)."""
    modules = {entry} | graph.find_upstream_modules(entry)
    # Importing `a.b.c` runs `a/__init__.py` and `a/b/__init__.py` too.
    modules |= {m.rsplit(".", n)[0] for m in modules for n in range(1, m.count(".") + 1)}
    files = {_module_file(m) for m in modules if m.startswith("flam_core")}
    return {f.relative_to(ROOT) for f in files if _has_code(f)}


def _has_code(path: Path) -> bool:
    """Whether a file holds more than a docstring."""
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) for node in body)


def _stage_deps(stage: dict) -> list[str]:
    spec = stage.get("do", stage)
    return [str(d) for d in spec.get("deps", [])]


def test_every_stage_depends_on_the_code_it_imports():
    graph = grimp.build_graph("flam_core")
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGE_ENTRIES), "a dvc.yaml stage without its entry module here, or the reverse"
    problems = []
    for name, stage in stages.items():
        code = stage_code(graph, STAGE_ENTRIES[name]) | STAGE_DATA.get(name, set())
        listed = [d for d in _stage_deps(stage) if d.startswith("flam_core")]
        missing = sorted(
            str(f) for f in code if not any(f == Path(d) or Path(d) in f.parents for d in listed)
        )
        unused = sorted(d for d in listed if not any(f == Path(d) or Path(d) in f.parents for f in code))
        problems += [f"{name}: misses {m}" for m in missing] + [
            f"{name}: lists {u}, never imported" for u in unused
        ]
    assert not problems, "dvc.yaml deps disagree with the imports:\n" + "\n".join(problems)


@pytest.mark.parametrize("stage", ["evaluate", "calibrate"])
def test_the_dependency_check_sees_the_model_code(stage):
    """The hole this guards: the model builder lives in flam_core/model, which the evaluating
    stages reach only through the model folder loader; it must count as their code."""
    code = stage_code(grimp.build_graph("flam_core"), STAGE_ENTRIES[stage])
    assert Path("flam_core/model/flam.py") in code
    assert Path("flam_core/model/folder.py") in code
