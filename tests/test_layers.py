"""The package's imports point down: every module sits in a layer, and a module imports only from
its own layer or the layers below it. Imports inside functions count (they are still arrows; they
only hide them), so this reads every ``import`` statement of every module under src/protopnet.

The allowed directions are written once, here: ``LAYERS`` from the bottom up. A new module must
be placed in a layer; an import that points up fails unless it is listed in ``KNOWN_UPWARD``
with the reason it is allowed. No module may import itself through others (a circle), except the
arrows of ``KNOWN_CIRCLES``; imports under ``if TYPE_CHECKING:`` (annotations) do not run and
close no circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "protopnet"

# Bottom to top. A unit is a top-level module or subpackage of protopnet (``protopnet`` itself is
# the package's __init__, which re-exports the public API from everywhere).
LAYERS: list[set[str]] = [
    # the network, the data, the arithmetic: they know nothing of training or files of models;
    # atomic_files writes any file whole (the data cache's index, model files, run logs)
    {"model", "data", "losses", "runtime", "regions", "atomic_files"},
    # typed configs (they name the backbones of model/) and prototype pictures (regions -> PIL)
    {"config", "visualize"},
    # model files: save/load, the model card, the Hub, ensembles (a model made of saved models);
    # save draws the prototype pictures (visualize) and hands them to checkpoint, which only stores
    {"checkpoint", "model_card", "hub", "ensemble", "save"},
    # training; pruning is one of its stages (the Trainer runs it), so it lives at this level
    {"train", "prune"},
    # what is done with a trained model
    {"explain", "interpretability", "edit", "export"},
    # the demo runs all of the above; the web app serves explanations and edits
    {"demo", "serve"},
    # entry points
    {"cli", "__main__", "protopnet"},
]

# (importing module, imported unit) pairs allowed to point up, each with why.
KNOWN_UPWARD: dict[tuple[str, str], str] = {
    # ProtoPNet.from_pretrained / save_pretrained are convenience methods on the model class (the
    # Hugging Face convention); they import storage inside the methods, so building or running a
    # model never loads it.
    ("protopnet.model.protopnet", "checkpoint"): "from_pretrained",
    ("protopnet.model.protopnet", "save"): "save_pretrained",
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
    assert set(KNOWN_CIRCLES) <= runtime_arrows(), "an exception no longer needed: remove it from KNOWN_CIRCLES"


def test_storage_never_draws():
    # checkpoint.py stores and loads model files; the pictures are drawn by its callers
    for source, target in arrows():
        if source == "protopnet.checkpoint":
            assert unit_of(target) not in {"visualize", "explain", "save"}, f"{source} -> {target}"


def test_training_imports_neither_editing_nor_explanations():
    for source, target in arrows():
        if unit_of(source) in {"train", "prune"}:
            assert unit_of(target) not in {"edit", "explain", "interpretability"}, f"{source} -> {target}"


def test_explanations_and_their_reports_are_no_circle():
    # local.py (the explanation) may write its report; the reports take explanations by type only
    assert ("protopnet.explain.local", "protopnet.explain.reports") in runtime_arrows()
    assert not any(s == "protopnet.explain.reports" and t.startswith("protopnet.explain.local") for s, t in runtime_arrows())


def test_the_walk_sees_imports_inside_functions():
    # the Trainer's prototype steps import the pruning stage inside a method
    assert ("protopnet.train.prototype_steps", "protopnet.prune") in arrows()


def runtime_arrows() -> set[tuple[str, str]]:
    """The arrows that run: every import but those under ``if TYPE_CHECKING:`` (annotations only)."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
                typing_only.update(id(n) for child in node.body for n in ast.walk(child))
        source = module_name(path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in typing_only:
                single = ast.Module(body=[node], type_ignores=[])
                found.update((source, target) for target in _imports_of(single, path))
    return found


def _imports_of(tree: ast.Module, path: Path) -> set[str]:
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "protopnet")
        elif isinstance(node, ast.ImportFrom):
            module = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else [])) if node.level else node.module or ""
            if module.split(".")[0] != "protopnet":
                continue
            for alias in node.names:
                found.add(f"{module}.{alias.name}" if is_module(f"{module}.{alias.name}") else module)
    return found


# (importing module, imported module) arrows that close a circle today, each with why. A new
# circle fails the test below; when one of these goes, remove it here.
KNOWN_CIRCLES: dict[tuple[str, str], str] = {
    ("protopnet.checkpoint", "protopnet.hub"): "load_model accepts a Hub id and hands it to the Hub loader, which reads model files",
    ("protopnet.checkpoint", "protopnet.model_card"): "every save writes the model card, which reads model.json",
}


def test_no_module_imports_itself_in_a_circle():
    # Package __init__ files re-export their modules, so they are left out; so are the known
    # upward arrows (the model's convenience methods). Annotation-only imports do not run.
    graph: dict[str, set[str]] = {}
    for source, target in runtime_arrows():
        if source == target or (source, unit_of(target)) in KNOWN_UPWARD or (source, target) in KNOWN_CIRCLES:
            continue
        if not (PACKAGE.parent / Path(*source.split("."))).is_dir() and not (PACKAGE.parent / Path(*target.split("."))).is_dir():
            graph.setdefault(source, set()).add(target)
    circles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(stack[stack.index(nxt):] + [node, nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert circles == [], "import circles:\n" + "\n".join(circles)


def test_a_parameter_named_progress_means_one_thing():
    # progress: protopnet.runtime.Progress, called with the items of each batch; a factory of bars
    # is progress_bars (runtime.ProgressBars). download_file keeps progress as the earlier name of
    # its byte_progress.
    allowed = {"progress": "Progress | None", "progress_bars": "ProgressBars | None"}
    odd = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                arguments = node.args.args + node.args.kwonlyargs
                for arg in arguments:
                    if arg.arg in allowed and (module_name(path), node.name) != ("protopnet.data.download", "download_file"):
                        annotation = ast.unparse(arg.annotation) if arg.annotation is not None else None
                        if annotation != allowed[arg.arg]:
                            odd.append(f"{module_name(path)}.{node.name}({arg.arg}: {annotation})")
    assert odd == [], "progress parameters of another meaning:\n" + "\n".join(odd)
