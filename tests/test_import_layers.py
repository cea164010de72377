"""The recipe's stages import only downward (docs/ARCHITECTURE.md): a static check of every
``import`` in ``recipe/iib_lpo``, at module level and inside functions, so a lazy import cannot
hide an upward dependency. The pure algorithm imports neither verl nor vLLM nor anything else of
the recipe, beyond torch / numpy / the standard library."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[1] / "recipe" / "iib_lpo"

# stage -> the recipe stages it may import (besides itself). Entry modules (main, train_cvae) and
# the package __init__ are the top: they may import anything.
ALLOWED = {
    "algorithm": set(),
    "reward": {"algorithm"},
    "latent": {"algorithm"},
    "rollout": {"algorithm", "latent"},
    "trainer": {"algorithm", "latent", "rollout", "reward"},
    "eval": {"algorithm", "reward"},
    # the demo is the top of the stack: it may also call the branch-quality tool (a top-level entry)
    "demo": {"algorithm", "latent", "rollout", "reward", "trainer", "eval", "latent_quality"},
    # the study runs the demo's stages for every arm and seed
    "study": {"algorithm", "latent", "rollout", "reward", "trainer", "eval", "latent_quality", "demo"},
}
TOP_LEVEL_ENTRIES = {"__init__", "main", "train_cvae", "latent_quality"}
# third-party roots the pure algorithm may use
ALGORITHM_THIRD_PARTY = {"torch", "numpy"}


def imported_modules(path: Path, root: Path = RECIPE) -> list[tuple[int, str]]:
    """(line, dotted module) of every import statement in ``path`` under the recipe package
    ``root`` (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(root.parents[1]).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "recipe.iib_lpo":  # from recipe.iib_lpo import <stage>
                out.extend((node.lineno, f"recipe.iib_lpo.{alias.name}") for alias in node.names)
            else:
                out.append((node.lineno, module))
    return out


def stage_of_module(dotted: str) -> str | None:
    parts = dotted.split(".")
    if parts[:2] != ["recipe", "iib_lpo"] or len(parts) < 3:
        return None
    return parts[2]


def stage_of_file(path: Path, root: Path = RECIPE) -> str:
    rel = path.relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def layering_violations(root: Path = RECIPE) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        stage = stage_of_file(path, root)
        if stage in TOP_LEVEL_ENTRIES:
            continue
        if stage not in ALLOWED:
            problems.append(f"{path.relative_to(root)}: stage {stage!r} is not in the layering table")
            continue
        for line, module in imported_modules(path, root):
            target = stage_of_module(module)
            root_name = module.split(".")[0]
            where = f"{path.relative_to(root)}:{line} imports {module}"
            if target is not None and target != stage and target not in ALLOWED[stage]:
                problems.append(f"{where} ({stage} may import only {sorted(ALLOWED[stage]) or 'nothing'} of the recipe)")
            if stage == "algorithm" and target is None:
                if root_name not in sys.stdlib_module_names and root_name not in ALGORITHM_THIRD_PARTY \
                        and root_name != "__future__":
                    problems.append(f"{where} (the pure algorithm uses only torch, numpy and the standard library)")
    return problems


def test_stages_import_only_downward():
    assert layering_violations() == []


def test_every_stage_is_a_package_in_the_table():
    packages = {p.name for p in RECIPE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(ALLOWED)


@pytest.mark.parametrize(
    "stage_file, source, expected",
    [
        # an upward import, also when lazy inside a function
        ("algorithm/x.py", "def f():\n    from recipe.iib_lpo.trainer import cpu_run\n", "algorithm/x.py:2 imports"),
        ("algorithm/x.py", "import verl\n", "the pure algorithm uses only"),
        ("algorithm/x.py", "from vllm import LLM\n", "the pure algorithm uses only"),
        ("latent/x.py", "from recipe.iib_lpo.rollout import seeds\n", "latent may import only ['algorithm']"),
        ("reward/x.py", "from recipe.iib_lpo import latent\n", "reward may import only ['algorithm']"),
        ("eval/x.py", "from ..trainer import cpu_run\n", "eval/x.py:1 imports recipe.iib_lpo.trainer"),
    ],
)
def test_checker_catches_an_upward_import(tmp_path, stage_file, source, expected):
    """The checker is not vacuous: each planted upward import is reported (mutation of the tree)."""
    root = tmp_path / "recipe" / "iib_lpo"
    for stage in ALLOWED:
        (root / stage).mkdir(parents=True)
        (root / stage / "__init__.py").write_text("")
    (root / stage_file).write_text(source)
    problems = layering_violations(root)
    assert any(expected in p for p in problems), problems
    # and a downward import is fine
    (root / stage_file).write_text("import torch\nfrom recipe.iib_lpo.algorithm import ib\n")
    assert layering_violations(root) == []
