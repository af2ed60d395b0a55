"""The package's imports point one way, down this list of layers (docs/design.md section 3):

    config 0 < model 1 < parallel 2 < data = diffusion 3 < checkpoint 4 < train 5 < eval = plan 6

A module may import its own layer (``diffmoe_dist.model.moe.layer`` imports ``diffmoe_dist.model.ffn``)
and any lower one; two layers of one rank may not import each other (data and diffusion, eval and
plan): what both need belongs lower down. Every import counts: module-level ones, those inside
functions (a lazy import is still a dependency), ``import diffmoe_dist.x``, ``from diffmoe_dist.x
import y``, relative imports and ``importlib.import_module("diffmoe_dist.x")`` with a literal name.
Imports under ``if TYPE_CHECKING:`` count for the layers (a lower layer should not know a higher
one's types) but not for cycles (they never run).

Modules directly under ``diffmoe_dist/``: a layer is named by its first component, so
``config.py`` and a ``config/`` package are both the config layer. ``diffmoe_dist/__init__.py`` runs
before every module of the package, so it imports nothing of the package (else importing the
config layer would import whatever it names). Any other top-level module or package not listed in
``RANKS`` fails the test until it is given a rank here (and in docs/design.md), so a new top-level
module cannot slip in beside the layers. Nothing in the package imports ``tools``, ``benchmarks``,
``tests`` or ``launchers``: they sit above the package.

No import cycles either, between modules (the graph of the imports that run, lazy ones included):
with the layers one-way, a cycle can only sit inside one layer. And no module over 400 lines.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "diffmoe_dist"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
RANKS = {
    "config": 0,
    "model": 1,
    "parallel": 2,
    "data": 3,
    "diffusion": 3,
    "checkpoint": 4,
    "train": 5,
    "eval": 6,
    "plan": 6,
}
ABOVE_THE_PACKAGE = ("tools", "benchmarks", "tests", "launchers")
MAX_LINES = 400


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    path: str  # file of the importer, relative to the repository
    line: int
    target: str  # dotted name of the imported module (the most specific module that exists)
    exists: bool  # False: no such module in the package (a moved or misspelt one)
    runs: bool  # False under `if TYPE_CHECKING:`


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> str | None:
    """``diffmoe_dist.model.moe.layer`` -> ``model``; the top package itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, runs: bool = True):
    """Every node below ``node`` with whether it runs (False inside ``if TYPE_CHECKING:``)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for part in child.body:
                yield part, False
                yield from _walk(part, False)
            for part in child.orelse:
                yield part, runs
                yield from _walk(part, runs)
            continue
        yield child, runs
        yield from _walk(child, runs)


def imports_of(path: Path, root: Path, modules: set[str]) -> list[Import]:
    """The package modules that ``path`` imports, anywhere in the file."""
    importer = module_name(path, root)
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    top = root.name
    rel = str(path.relative_to(root.parent))
    found = []

    def add(node: ast.AST, runs: bool, name: str, names: tuple[str, ...] = ()) -> None:
        if name.split(".")[0] != top:
            return
        targets = [f"{name}.{n}" for n in names if f"{name}.{n}" in modules] or [name]
        if len(targets) < len(names):  # `from pkg import module, attribute`: pkg too
            targets.append(name)
        for target in dict.fromkeys(targets):
            found.append(Import(importer, rel, node.lineno, target, target in modules, runs))

    for node, runs in _walk(ast.parse(path.read_text(), filename=rel)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node, runs, alias.name)
            for alias in node.names:
                if alias.name.split(".")[0] in ABOVE_THE_PACKAGE:
                    found.append(Import(importer, rel, node.lineno, alias.name, True, runs))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] in ABOVE_THE_PACKAGE:
                found.append(Import(importer, rel, node.lineno, name, True, runs))
            add(node, runs, name, tuple(a.name for a in node.names if a.name != "*"))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            add(node, runs, node.args[0].value)
    return found


def package_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def scan(root: Path) -> tuple[list[Path], list[Import]]:
    files = package_files(root)
    modules = {module_name(p, root) for p in files}
    return files, [imp for p in files for imp in imports_of(p, root, modules)]


def layer_violations(root: Path) -> list[str]:
    files, imports = scan(root)
    top = root.name
    out = []
    for p in files:
        name = layer(module_name(p, root))
        if name is not None and name not in RANKS:
            out.append(
                f"{p.relative_to(root.parent)}: {top}.{name} belongs to no layer: move it into one of "
                f"{', '.join(RANKS)}, or give it a rank in RANKS (tests/test_layering.py) and docs/design.md section 3"
            )
    for imp in imports:
        where = f"{imp.path}:{imp.line}"
        src, dst = layer(imp.importer), layer(imp.target)
        if imp.target.split(".")[0] in ABOVE_THE_PACKAGE:
            out.append(
                f"{where}: {imp.importer} imports {imp.target}: {imp.target.split('.')[0]}/ sits above the "
                f"package; move what it needs into {top}/"
            )
        elif src is None:
            if dst is not None:
                out.append(
                    f"{where}: {top}/__init__.py imports {imp.target}: it runs before every module of the "
                    "package, so it imports nothing of it; import the module where it is used"
                )
        elif dst is None or src == dst or src not in RANKS or dst not in RANKS:
            continue  # the top package (import-free), the own layer, or a layer-less module (named above)
        elif RANKS[dst] > RANKS[src]:
            out.append(
                f"{where}: {imp.importer} imports {imp.target}: {src} (rank {RANKS[src]}) may not import "
                f"{dst} (rank {RANKS[dst]}); move what {src} needs down into {src} or below, or have {dst} "
                f"pass it in"
            )
        elif RANKS[dst] == RANKS[src]:
            out.append(
                f"{where}: {imp.importer} imports {imp.target}: {src} and {dst} share rank {RANKS[src]} and "
                f"may not import each other; move what both need below rank {RANKS[src]}"
            )
    return out


def missing_modules(root: Path) -> list[str]:
    return [
        f"{imp.path}:{imp.line}: {imp.importer} imports {imp.target}, which is no module of the package "
        "(moved or renamed?): import it from where it lives now"
        for imp in scan(root)[1]
        if not imp.exists
    ]


def cycles(root: Path) -> list[str]:
    """One line per strongly connected set of modules: a cycle through it, each step with its line."""
    _, imports = scan(root)
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports:
        if imp.runs and imp.exists and imp.target != imp.importer:
            edges.setdefault(imp.importer, {}).setdefault(imp.target, imp)
    # Tarjan's strongly connected components, iteratively
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, {}))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(set(component))
    out = []
    for component in components:
        first = min(component)
        # shortest way back to `first` inside the component (breadth first), named step by step
        paths = {first: [first]}
        queue = [first]
        cycle = None
        while queue and cycle is None:
            node = queue.pop(0)
            for child in sorted(edges.get(node, {})):
                if child == first:
                    cycle = paths[node] + [first]
                    break
                if child in component and child not in paths:
                    paths[child] = paths[node] + [child]
                    queue.append(child)
        steps = [f"{a} ({edges[a][b].path}:{edges[a][b].line})" for a, b in zip(cycle, cycle[1:], strict=False)]
        out.append(
            "import cycle: " + " -> ".join([*steps, first]) + ": move what both sides use into a module below "
            "them, or pass it in"
        )
    return sorted(out)


def long_modules(root: Path) -> list[str]:
    out = []
    for p in package_files(root):
        n = len(p.read_text().splitlines())
        if n > MAX_LINES:
            out.append(f"{p.relative_to(root.parent)}: {n} lines > {MAX_LINES}: split it by concern")
    return out


def _fail(violations: list[str], what: str) -> None:
    if violations:
        pytest.fail(f"{len(violations)} {what}:\n" + "\n".join(violations), pytrace=False)


def test_imports_point_down_the_layers():
    _fail(layer_violations(ROOT), "imports against config < model < parallel < data = diffusion < checkpoint < "
          "train < eval = plan")  # fmt: skip


def test_no_import_cycles():
    _fail(cycles(ROOT), "import cycles")


def test_every_imported_package_module_exists():
    _fail(missing_modules(ROOT), "imports of modules the package does not have")


def test_no_module_over_400_lines():
    _fail(long_modules(ROOT), f"modules over {MAX_LINES} lines")


# ---- the walk itself, on a planted package: each kind of import, each kind of violation ----------
PLANTED = {
    "__init__.py": "",
    "config.py": "import os\n",
    "model/__init__.py": "from pkg.model.dit import DiT\n",
    "model/dit.py": """\
from pkg import config
from . import blocks
def build():
    from pkg.train import loop  # lazy, upward
""",
    "model/blocks.py": "import pkg.model.dit\n",  # a cycle with dit, which imports blocks
    "data/__init__.py": "",
    "data/shards.py": """\
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from ..diffusion.flow import Flow  # same rank, type-only
import importlib
importlib.import_module("pkg.eval.cli")
""",
    "diffusion/__init__.py": "",
    "diffusion/flow.py": "from pkg.data import shards\nfrom pkg.model import DiT, dit\n",
    "train/__init__.py": "",
    "train/loop.py": "from pkg.model.gone import x\nfrom tools.plan import y\n" + "pass\n" * 400,
    "eval/__init__.py": "",
    "eval/cli.py": "from pkg.train import loop\nfrom pkg.checkpoint.io import save\n",
    "utils.py": "",
}


@pytest.fixture
def planted(tmp_path) -> Path:
    root = tmp_path / "pkg"
    for rel, text in PLANTED.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_the_walk_finds_each_kind_of_violation_on_a_planted_package(planted):
    got = layer_violations(planted)
    for expected in (
        "pkg/utils.py: pkg.utils belongs to no layer",
        "pkg/model/dit.py:4: pkg.model.dit imports pkg.train.loop: model (rank 1) may not import train (rank 5)",
        "pkg/data/shards.py:3: pkg.data.shards imports pkg.diffusion.flow: data and diffusion share rank 3",
        "pkg/data/shards.py:5: pkg.data.shards imports pkg.eval.cli: data (rank 3) may not import eval (rank 6)",
        "pkg/diffusion/flow.py:1: pkg.diffusion.flow imports pkg.data.shards: diffusion and data share rank 3",
        "pkg/train/loop.py:2: pkg.train.loop imports tools.plan: tools/ sits above the package",
    ):
        assert sum(line.startswith(expected) for line in got) == 1, (expected, got)
    # downward and own-layer imports pass: config from model, model from diffusion, train from eval,
    # the package's own modules (relative `from . import blocks` too); and checkpoint, which does not
    # exist, ranks below eval
    assert len(got) == 6, got
    assert missing_modules(planted) == [
        "pkg/eval/cli.py:2: pkg.eval.cli imports pkg.checkpoint.io, which is no module of the package "
        "(moved or renamed?): import it from where it lives now",
        "pkg/train/loop.py:1: pkg.train.loop imports pkg.model.gone, which is no module of the package "
        "(moved or renamed?): import it from where it lives now",
    ]
    assert long_modules(planted) == ["pkg/train/loop.py: 402 lines > 400: split it by concern"]


def test_the_walk_names_a_cycle_and_ignores_type_only_imports(planted):
    # dit -> blocks -> dit; data.shards <-> diffusion.flow only through a TYPE_CHECKING import: no cycle
    assert cycles(planted) == [
        "import cycle: pkg.model.blocks (pkg/model/blocks.py:1) -> pkg.model.dit (pkg/model/dit.py:2) -> "
        "pkg.model.blocks: move what both sides use into a module below them, or pass it in"
    ]
    (planted / "__init__.py").write_text("from pkg.model import dit\n")
    assert any(line.startswith("pkg/__init__.py:1: pkg/__init__.py imports pkg.model.dit") for line in
               layer_violations(planted))  # fmt: skip
