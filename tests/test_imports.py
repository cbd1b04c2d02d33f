"""Imports run one way (issue #23): no cycle among the exporter's modules, lazy imports included; the
sources import nothing of the pipeline, the web side or the diagnosis; the fakes and pynvml load only
when asked for."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "exporter"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The exporter modules a file imports anywhere (top level, in functions, under TYPE_CHECKING):
    `from exporter import x` counts as exporter.x when that is a module."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in modules}


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    # A package's __init__ re-exporting its own modules is not a dependency of those modules on it.
    return {m: {d for d in imports_of(p, modules) if d != m and not m.startswith(d + ".")}
            for m, p in files.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first walk (one path per back edge)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    return found


def test_the_graph_is_read():
    g = graph()
    assert "exporter.cli" in g and "exporter.pipeline.collector" in g["exporter.cli"]
    assert "exporter.sources.nvml.reader" in g["exporter.sources.nvml.source"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]  # the walk finds one


def test_no_import_cycle():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


# What a source may use besides other sources: small helpers with no exporter imports of their own.
SOURCE_MAY_USE = {"exporter.transitions", "exporter.durations"}


def test_sources_import_nothing_of_the_pipeline_web_or_diagnosis():
    g = graph()
    sources = [m for m in g if m.startswith("exporter.sources")]
    assert len(sources) > 10
    for m in sources:
        outside = {d for d in g[m] if not d.startswith("exporter.sources") and d not in SOURCE_MAY_USE}
        assert not outside, f"{m} imports {sorted(outside)}"
    for helper in SOURCE_MAY_USE:
        assert not g[helper], f"{helper} imports {sorted(g[helper])}: no longer a leaf"


def test_the_fakes_and_pynvml_load_only_when_asked_for(procfs):
    code = ("import sys; from exporter.cli import parse_config; "
            f"parse_config(['--path.procfs', {str(procfs.root)!r}]); "
            "print(' '.join(m for m in sys.modules if m.startswith(('exporter.fake', 'pynvml'))))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [], r.stdout
    r = subprocess.run([sys.executable, "-c", code.replace("'--path.procfs'", "'--fake-gpus', '1', "
                                                           "'--fake-mig', '1g.10gb', '--path.procfs'")],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "exporter.fake.nvml" in r.stdout.split(), r.stdout + r.stderr


# The packages, top to bottom (docs/architecture.md): a module imports only its own package and those
# below it. The leaves (durations, environment, transitions, flagparser, promlazy) import nothing of the exporter.
LAYERS = ("exporter.cli", "exporter.web", "exporter.diagnosis", "exporter.fake", "exporter.pipeline",
          "exporter.sources")
LEAVES = ("exporter.durations", "exporter.environment", "exporter.transitions", "exporter.flagparser",
          "exporter.promlazy")
ENTRY_POINTS = ("exporter.cli", "exporter.__main__", "exporter.healthcheck")


def layer(module: str) -> int:
    for k, top in enumerate(LAYERS):
        if module == top or module.startswith(top + "."):
            return k
    if module in ENTRY_POINTS:
        return 0
    if module in LEAVES:
        return len(LAYERS)
    raise AssertionError(f"{module}: in no layer of LAYERS (add it where it belongs)")


def test_imports_run_down_the_layers_only():
    g = graph()
    wrong = [f"{m} -> {d}" for m, deps in g.items() if m != "exporter" for d in deps
             if d != "exporter" and layer(d) < layer(m)]
    assert not wrong, "imports up the layers: " + "; ".join(sorted(wrong))
    for leaf in LEAVES:
        assert not {d for d in g[leaf] if d != "exporter"}, f"{leaf} is no longer a leaf: {sorted(g[leaf])}"
    assert layer("exporter.web.httpd") < layer("exporter.pipeline.sampler") < layer("exporter.sources.procfs")
