"""The package layers import only downward, and no torchslim module is imported inside a function.

Layers, bottom to top; packages in one layer do not import each other (so each technique stands alone)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "torchslim"
LAYERS = [
    ("core", "_version"),
    ("nn",),
    ("data", "models"),
    ("metrics",),
    ("training", "export"),
    ("pruning", "quantization", "lowrank", "distillation"),
    ("techniques",),
    ("hf",),
    ("pipeline",),
    ("search",),
    ("cli",),
]
RANK = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def _module_name(path: Path) -> list[str]:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imports(path: Path):
    """(line, imported torchslim module parts, inside a function) for each torchslim import of ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here[:-1]
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(n) for f in functions for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
            else:
                target = (node.module or "").split(".")
            names = [target + [a.name] for a in node.names] if len(target) == 1 else [target]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names]
        else:
            continue
        for t in names:
            if t[0] == "torchslim":
                yield node.lineno, t, id(node) in nested


def _files():
    return sorted(p for p in SRC.rglob("*.py"))


def _layer_of(parts: list[str]) -> str | None:
    return parts[1] if len(parts) > 1 else None


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_go_downward(path: Path):
    own = _layer_of(_module_name(path))
    if own is None:  # torchslim/__init__.py: the public surface, above every layer
        return
    assert own in RANK, f"{path}: package {own!r} has no layer; add it to LAYERS (and to the README's diagram)"
    problems = []
    for line, target, in_function in _imports(path):
        if in_function:
            problems.append(f"line {line}: imports {'.'.join(target)} inside a function")
        other = _layer_of(target)
        if other is None or other == own:
            continue
        if other not in RANK:
            problems.append(f"line {line}: imports {'.'.join(target)}, a package with no layer")
        elif RANK[other] > RANK[own]:
            problems.append(f"line {line}: {own} (layer {RANK[own]}) imports {'.'.join(target)} (layer {RANK[other]})")
        elif RANK[other] == RANK[own]:
            problems.append(f"line {line}: {own} imports {'.'.join(target)}, a package of its own layer")
    assert not problems, f"{path.relative_to(SRC)}:\n  " + "\n  ".join(problems)


def test_every_package_has_a_layer():
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    packages |= {p.stem for p in SRC.glob("*.py") if p.stem != "__init__"}
    assert packages <= set(RANK), f"packages without a layer: {sorted(packages - set(RANK))}"
