"""The layers of capcli as a checked contract: import-linter's contracts (pyproject.toml), and no
import cycle at all, counting every import (those inside functions too) and the package
``__init__`` modules that Python runs before any module inside them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
grimp = pytest.importorskip("grimp", reason="import-linter (the test extra) is not installed")


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("capcli", cache_dir=None)


def test_import_linter_contracts_are_kept():
    """`lint-imports` with pyproject.toml's contracts: the layers, the model over its fast paths,
    Typer and rich only in the commands, no torch code in the commands."""
    done = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", "--no-cache"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def _packages(graph) -> set[str]:
    return {m for m in graph.modules if any(o.startswith(m + ".") for o in graph.modules)}


def _edges(graph) -> dict[str, set[str]]:
    """Every module -> the capcli modules its import statements name, plus the packages above each
    (importing ``a.b.c`` runs ``a/b/__init__.py`` first). The root package is left out as a target:
    it runs before anything, and imports only ``capcli.version`` when it does (tested below)."""
    edges: dict[str, set[str]] = {}
    for m in graph.modules:
        targets = set()
        for x in graph.find_modules_directly_imported_by(m):
            if not x.startswith("capcli"):
                continue
            parts = x.split(".")
            targets.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
        edges[m] = targets - {m}
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for x in sorted(edges.get(m, ())):
            if state.get(x) == 1:
                return stack[stack.index(x):] + [x]
            if state.get(x) is None:
                found = visit(x)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if state.get(m) is None:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle_counting_every_import_and_package_inits(graph):
    cycle = _cycle({m: t for m, t in _edges(graph).items() if m != "capcli"})
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_sees_lazy_imports_and_package_inits():
    """The check would catch what a reader misses: an import inside a function, and a package
    whose __init__ imports a module that imports back into the package."""
    assert _cycle({"a.x": {"a.y"}, "a.y": {"a.x"}}) == ["a.x", "a.y", "a.x"]
    fake = type("G", (), {"modules": {"capcli.p", "capcli.p.m", "capcli.q"},
                          "find_modules_directly_imported_by": lambda self, m: {
                              "capcli.p": {"capcli.q"}, "capcli.q": {"capcli.p.m"}, "capcli.p.m": set()}[m]})()
    assert _cycle(_edges(fake)) is not None  # q imports p.m, which first runs p/__init__, which imports q


def test_package_inits_import_nothing_and_the_root_only_its_version(graph):
    """A package's __init__ runs before every module inside it, so it imports none of capcli (a
    docstring is enough); the root imports capcli.version and, lazily on first use of
    ``capcli.Captioner``, the public API."""
    for package in _packages(graph) - {"capcli"}:
        inner = {x for x in graph.find_modules_directly_imported_by(package) if x.startswith("capcli")}
        assert not inner, f"{package}/__init__.py imports {sorted(inner)}"
    root = {x for x in graph.find_modules_directly_imported_by("capcli") if x.startswith("capcli")}
    assert root == {"capcli.version", "capcli.api"}
    import ast

    tree = ast.parse((REPO / "capcli" / "__init__.py").read_text())
    top = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert [n.module for n in top] == ["capcli.version"]  # the api only inside __getattr__


def test_prepare_imports_no_torch():
    """`capcli prepare` runs without importing torch (a second or more of every start)."""
    code = ("import sys; from capcli.cli.main import app; from typer.testing import CliRunner; "
            "import tempfile, os; d = tempfile.mkdtemp(); "
            "r = CliRunner().invoke(app, ['prepare', 'synthetic', '--out', os.path.join(d, 'x'), '--images', '12', "
            "'--size', '16', '-q']); print(r.exit_code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["0", "False"], out.stdout + out.stderr
