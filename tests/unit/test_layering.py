"""The package's imports point one way: no import cycle between files, no import up the layer table of
`docs/architecture.md`, and the framework-free modules listed there stay free of torch and Lightning.

Imports are read with `ast` (nothing is imported): lazy imports inside functions count, imports under
`if TYPE_CHECKING:` do not. A module belongs to the table row of its longest matching name.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "src" / "qed_lightning"
DOC = ROOT / "docs" / "architecture.md"
FRAMEWORKS = ("lightning", "torch", "transformers", "datasets")


def module_files() -> dict[str, Path]:
    """Dotted name (relative to `qed_lightning`, "" for the package itself) -> file."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(x) for stmt in node.body for x in ast.walk(stmt)}
    return skip


def imported_names(name: str, path: Path) -> list[str]:
    """Every `qed_lightning.*` name `path` imports (absolute dotted, relative to `qed_lightning`), relative imports
    resolved; `from pkg import x` yields `pkg.x` (resolved to `pkg` later unless `x` is a module)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = "qed_lightning" + ("." + package if package else "")
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = anchor + ("." + base if base else "")
            names += [f"{base}.{a.name}" for a in node.names]  # `pkg.sub` if a module, else resolved to `pkg`
    return [n.removeprefix("qed_lightning").lstrip(".") for n in names
            if n == "qed_lightning" or n.startswith("qed_lightning.")]


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (each name resolved to the longest existing module)."""
    files = module_files()
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for target in imported_names(name, path):
            while target not in files:
                target = target.rpartition(".")[0]
            if target != name and target:
                targets.add(target)
        graph[name] = targets
    return graph


def layer_table() -> dict[str, int]:
    """Module prefix -> layer, read from the table in docs/architecture.md (rows `| <layer> | `a`, `b` | ... |`)."""
    layers = {}
    for line in DOC.read_text().splitlines():
        row = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if row:
            for prefix in re.findall(r"`([\w.]+)`", row.group(2)):
                layers[prefix] = int(row.group(1))
    return layers


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    for prefix in sorted(layers, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return layers[prefix]
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles between files (make one side import the other, never both): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_every_module_has_a_layer():
    layers = layer_table()
    assert layers, f"no layer table found in {DOC}"
    missing = sorted(m for m in module_files() if m and layer_of(m, layers) is None)
    assert not missing, f"modules in no row of the layer table of {DOC.name}: {missing}"


def test_imports_point_down():
    layers = layer_table()
    files = module_files()
    upward = []
    for module, targets in import_graph().items():
        if not module:
            continue
        own = layer_of(module, layers)
        is_init = files[module].name == "__init__.py"
        for target in sorted(targets):
            if is_init and target.startswith(module + "."):
                continue  # a package's __init__ re-exports its own members
            if own is not None and layer_of(target, layers) is not None and layer_of(target, layers) > own:
                upward.append(f"{module} (layer {own}) imports {target} (layer {layer_of(target, layers)})")
    assert not upward, f"imports up the layer table of {DOC.name}:\n" + "\n".join(upward)


def test_the_checker_sees_a_cycle_and_lazy_imports(tmp_path):
    """The reader itself: a lazy import counts, a TYPE_CHECKING one does not, and a two-file loop is a cycle."""
    lazy = tmp_path / "a.py"
    lazy.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from qed_lightning.x import X\n"
                    "def f():\n    from qed_lightning.b import g\n")
    assert imported_names("a", lazy) == ["b.g"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_framework_free_modules_import_no_framework():
    """`data.records` and the other floor formats listed in docs/architecture.md load without torch or Lightning
    (run in a fresh interpreter, since this one has them loaded)."""
    text = DOC.read_text()
    listed = re.search(r"Modules that import no framework.*?anywhere:(.*?)(?:\n\n|\Z)", text, re.S)
    assert listed, f"{DOC.name} lists no framework-free modules"
    modules = re.findall(r"`([\w.]+)`", listed.group(1))
    assert "data.records" in modules
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module('qed_lightning.' + m)\n"
            f"print(sorted(k for k in {FRAMEWORKS!r} if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"{modules} pulled in {out.stdout.strip()}"


def test_tiny_tokenizer_reads_the_repos_pinned_samples():
    """`qed-make-tiny` trains its tokenizer on the repo's sample files, found relative to its own file; a move of the
    module must not make it fall back silently to the embedded corpus (every tiny-model number would change)."""
    from qed_lightning.tools.tiny import CORPUS_FILES, _repo_samples

    assert [Path(p).name for p in _repo_samples()] == list(CORPUS_FILES)
