"""The launcher's modules import downward only: no two modules reach each other, not even
through an import inside a function (the way a circle gets hidden)."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter

from tests.conftest import ROOT

PKG = ROOT / "launcher"


def _imports(path) -> set[str]:
    """Every launcher module `path` imports, at the top or inside a function."""
    modules = {p.stem for p in PKG.glob("*.py")}
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "launcher":
            found |= {a.name for a in node.names if a.name in modules}  # `from launcher import local`
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("launcher."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("launcher.")}
    return found - {"__init__"}


def graph() -> dict[str, set[str]]:
    # the package's __init__ is its lazy facade (`from launcher import launch_job`), not a layer
    return {p.stem: _imports(p) for p in PKG.glob("*.py") if p.stem != "__init__"}


def test_no_launcher_module_imports_one_that_imports_it_back():
    try:
        order = list(TopologicalSorter(graph()).static_order())
    except CycleError as exc:
        raise AssertionError(f"import circle: {' -> '.join(exc.args[1])}") from None
    # a layer order exists, and the verbs sit above the library they call
    assert order.index("cli") > order.index("control") > order.index("job") > order.index("merge")


def test_the_check_sees_an_import_hidden_inside_a_function(tmp_path):
    hidden = tmp_path / "m.py"
    hidden.write_text("from launcher import local\n\ndef f():\n    from launcher.job import Job\n"
                      "    import launcher.merge\n")
    assert _imports(hidden) == {"local", "job", "merge"}
