"""The shape of the package: no import circles, no private names used across modules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bitdance"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]):
    """(target module, imported names, line) of every import of the package's own modules, at any depth
    (imports inside functions count: they are circles all the same, only deferred)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    # A module-level __getattr__ is where an old name is forwarded to its new module, with a
    # DeprecationWarning, on first use: the one deliberate upward import.
    shims = {id(n) for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
             for n in ast.walk(f)}
    for node in ast.walk(tree):
        if id(node) in shims:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.split(".")[0] != "bitdance":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub if sub in modules else target), alias.name, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "bitdance":
                    yield alias.name, alias.name, node.lineno


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        for target, _, _ in _imports(name, path, modules):
            # importing a.b.c runs a and a.b first: an edge to each package on the way
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                t = ".".join(parts[:i])
                if t in modules and t != name and not name.startswith(t + "."):
                    graph[name].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    graph = _graph()
    assert len(graph) > 20
    assert _cycles(graph) == []


def test_old_module_paths_import_with_a_warning(recwarn):
    """The module paths of 0.1 keep working for one release; each names its new home once."""
    import importlib
    import sys
    import warnings

    from bitdance.formats.official import load_tokenizer
    from bitdance.moved import MOVED
    from bitdance.training.t2i_packing import pack_batch

    for old, homes in MOVED.items():
        for home in homes:
            importlib.import_module(home)  # every new home exists
        sys.modules.pop(old, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(old)
        assert any(issubclass(w.category, DeprecationWarning) and homes[0] in str(w.message) for w in caught), old
        assert dir(module)
    from bitdance.checkpoint import load_tokenizer as old_load_tokenizer  # noqa: F401 (the old spelling)

    assert old_load_tokenizer is load_tokenizer
    import bitdance

    assert bitdance.t2i.pack_batch is pack_batch  # split modules forward to every new home
    import pytest

    with pytest.raises(AttributeError, match="moved to"):
        bitdance.checkpoint.no_such_name


def test_old_module_paths_run_with_python_m():
    """``python -m bitdance.cli`` (the 0.1 spelling, in scripts and docs of that release) runs the new CLI
    with the warning; runpy needs code from the stand-in's loader, which plain imports never ask for."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-W", "always::DeprecationWarning", "-m", "bitdance.cli", "--version"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("bitdance ")
    assert "bitdance.cli has moved to bitdance.apps.cli" in p.stderr


def test_no_private_names_across_modules():
    modules = _modules()
    bad = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {imported} from {target}"
           for name, path in modules.items() for target, imported, line in _imports(name, path, modules)
           if imported.startswith("_") and not imported.startswith("__") and target != name]
    assert bad == []
