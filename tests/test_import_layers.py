"""The house's rules read from the source: a package imports only from its own floor or the floors below it,
and every module opens with a docstring that reads as written.

    common  <-  model_parallel, data_pipeline, vq, sr  <-  training  <-  evaluation, demo, bench, slurm

Every import is read from the source (lazy imports inside functions included), so a lower floor that
reaches upward fails here naming the file, the line and the package it reached for.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLOORS = [("common",), ("model_parallel", "data_pipeline", "vq", "sr"), ("training",),
          ("evaluation", "demo", "bench", "slurm")]
FLOOR_OF = {package: level for level, packages in enumerate(FLOORS) for package in packages}


def imported_packages(tree: ast.AST):
    """(line, top-level package) of every absolute import in a module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


def upward_imports(root: Path = ROOT) -> list[str]:
    found = []
    for package, floor in FLOOR_OF.items():
        for file in sorted((root / package).rglob("*.py")):
            for line, target in imported_packages(ast.parse(file.read_text(), str(file))):
                if FLOOR_OF.get(target, -1) > floor:
                    found.append(f"{file.relative_to(root)}:{line} ({package}, floor {floor}) imports {target} "
                                 f"(floor {FLOOR_OF[target]})")
    return found


def test_every_package_is_on_a_floor():
    packages = {p.parent.name for p in ROOT.glob("*/*.py")} - {"tests"}
    assert packages <= set(FLOOR_OF), f"folders of code without a floor: {sorted(packages - set(FLOOR_OF))}"


def test_no_floor_imports_from_a_higher_one():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path):
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "x.py").write_text("def f():\n    from training.train import main\n")
    assert upward_imports(tmp_path) == ["common/x.py:2 (common, floor 0) imports training (floor 2)"]


def docstring_defects(root: Path = ROOT) -> list[str]:
    """Modules (empty __init__.py aside) without a docstring, and docstrings whose command lines end in ` \\` but
    are not raw: Python joins such lines in `__doc__`, so the module's own usage reads differently from its file."""
    found = []
    for file in sorted(root.rglob("*.py")):
        source = file.read_text()
        if any(part.startswith(".") for part in file.relative_to(root).parts) or not source.strip():
            continue
        tree = ast.parse(source, str(file))
        if ast.get_docstring(tree) is None:
            found.append(f"{file.relative_to(root)}: no module docstring")
        elif "\\\n" in (text := ast.get_source_segment(source, tree.body[0].value)) and text[0] not in "rR":
            found.append(f"{file.relative_to(root)}: docstring continues lines with a backslash but is not r\"\"\"")
    return found


def test_every_module_opens_with_a_docstring_that_reads_as_written(tmp_path):
    assert docstring_defects() == []
    (tmp_path / "a.py").write_text('"""Run it:\n\n    python -m a --x 1 \\\n        --y 2\n"""\n')
    (tmp_path / "b.py").write_text("import os\n")
    (tmp_path / "c.py").write_text('r"""Run it:\n\n    python -m c --x 1 \\\n        --y 2\n"""\n')
    assert docstring_defects(tmp_path) == ['a.py: docstring continues lines with a backslash but is not r"""',
                                           "b.py: no module docstring"]
