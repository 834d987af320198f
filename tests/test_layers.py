"""The package's imports point down: every module sits in a layer, and a module imports only from
its own layer or the layers below it. Imports inside functions count (they are still arrows; they
only hide them), so this reads every ``import`` statement of every module under src/protopnet.

The allowed directions are written once, here: ``LAYERS`` from the bottom up. A new module must
be placed in a layer; an import that points up fails unless it is listed in ``KNOWN_UPWARD``
with the reason it is allowed.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "protopnet"

# Bottom to top. A unit is a top-level module or subpackage of protopnet (``protopnet`` itself is
# the package's __init__, which re-exports the public API from everywhere).
LAYERS: list[set[str]] = [
    # the network, the data, the arithmetic: they know nothing of training or files of models
    {"model", "data", "losses", "runtime", "regions"},
    # typed configs (they name the backbones of model/) and prototype pictures (regions -> PIL)
    {"config", "visualize"},
    # model files: save/load, the model card, the Hub, ensembles (a model made of saved models)
    {"checkpoint", "model_card", "hub", "ensemble"},
    # training; pruning is one of its stages (the Trainer runs it), so it lives at this level
    {"train", "prune"},
    # what is done with a trained model
    {"explain", "interpretability", "edit", "export"},
    # the demo runs all of the above
    {"demo"},
    # entry points
    {"cli", "__main__", "protopnet"},
]

# (importing module, imported unit) pairs allowed to point up, each with why.
KNOWN_UPWARD: dict[tuple[str, str], str] = {
    # ProtoPNet.from_pretrained / save_pretrained are convenience methods on the model class (the
    # Hugging Face convention); they import storage inside the methods, so building or running a
    # model never loads it.
    ("protopnet.model.protopnet", "checkpoint"): "from_pretrained/save_pretrained",
    ("protopnet.model.protopnet", "hub"): "from_pretrained",
}

RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (PACKAGE.parent / relative).with_suffix(".py").is_file() or (PACKAGE.parent / relative / "__init__.py").is_file()


def unit_of(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "protopnet"


def imported_modules(path: Path) -> set[str]:
    """Every protopnet module ``path`` imports, at any depth of its code."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "protopnet")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "protopnet":
                continue
            for alias in node.names:
                if is_module(f"{module}.{alias.name}"):
                    found.add(f"{module}.{alias.name}")  # from . import explain: the submodule
                elif module == "protopnet" and alias.name == "__version__":
                    continue  # a constant of the package's __init__, not code of a layer above
                else:
                    found.add(module)
    return found


def arrows() -> list[tuple[str, str]]:
    return sorted((module_name(path), target) for path in PACKAGE.rglob("*.py") for target in imported_modules(path))


def test_every_unit_of_the_package_is_in_a_layer():
    units = {unit_of(module_name(path)) for path in PACKAGE.rglob("*.py")}
    assert units - set(RANK) == set(), "place the new module in a layer of LAYERS"


def test_imports_point_down_or_sideways():
    upward = []
    for source, target in arrows():
        a, b = unit_of(source), unit_of(target)
        if a != b and RANK[b] > RANK[a] and (source, b) not in KNOWN_UPWARD:
            upward.append(f"{source} -> {target}")
    assert upward == [], "imports pointing up a layer:\n" + "\n".join(upward)


def test_the_known_exceptions_still_exist():
    present = {(source, unit_of(target)) for source, target in arrows()}
    assert set(KNOWN_UPWARD) <= present, "an exception no longer needed: remove it from KNOWN_UPWARD"


def test_training_imports_neither_editing_nor_explanations():
    for source, target in arrows():
        if unit_of(source) in {"train", "prune"}:
            assert unit_of(target) not in {"edit", "explain", "interpretability"}, f"{source} -> {target}"


def test_the_walk_sees_imports_inside_functions():
    # the Trainer imports its pruning stage inside a method
    assert ("protopnet.train.loop", "protopnet.prune") in arrows()
