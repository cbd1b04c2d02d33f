"""The docs name only what exists (issue #23): every Python file, every dotted `exporter.…` module name in
README.md and docs/*.md, and in docs/architecture.md every class, function, constant and thread it cites.
A module moved or renamed without its docs fails here, not in a new maintainer's first hour."""
from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "exporter"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ARCHITECTURE = REPO / "docs" / "architecture.md"
# Where a bare file name (`httpd.py`) may live; .venv and .git are not the project's.
SOURCE_DIRS = ("exporter", "bench", "tests", "testkit", "grafana", "deploy")

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`([^`\n]+)`")
PY_FILE = re.compile(r"(?<![\w./-])((?:[\w-]+/)*[\w-]+\.py)\b")
DOTTED_MODULE = re.compile(r"(?<![\w./-])exporter(?:\.\w+)+")
# A code span that cites Python: a name or a dotted name, `()` allowed at the end.
PYTHON_NAME = re.compile(r"_?[A-Za-z]\w*(?:\.\w+)*(?:\(\))?")
# Snake-case spans that are metric families, not Python names.
METRIC_PREFIXES = ("gpu_", "host_", "cgroup_", "exporter_", "process_")


def text(doc: Path) -> str:
    return doc.read_text(encoding="utf-8")


def prose(doc_text: str) -> str:
    """The text outside fenced code blocks, where backticks pair up as code spans."""
    return FENCE.sub("", doc_text)


@cache
def files_named(name: str) -> tuple[Path, ...]:
    return tuple(p for d in SOURCE_DIRS for p in (REPO / d).rglob(name) if ".venv" not in p.parts)


def py_file_exists(cited: str) -> bool:
    """A cited .py file: a path from the repository root or from exporter/ (`sources/gpm.py`), or a bare
    name that exactly one module of exporter/ has, else exactly one file of the project (an ambiguous
    bare name says too little)."""
    if (REPO / cited).is_file() or (PACKAGE / cited).is_file():
        return True
    if "/" in cited:
        return False
    found = files_named(cited)
    return len([p for p in found if p.is_relative_to(PACKAGE)]) == 1 or len(found) == 1


def module_file(dotted: str) -> Path | None:
    path = REPO.joinpath(*dotted.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def top_level_names(path: Path) -> frozenset[str]:
    """What `from module import x` could take: definitions, assignments and imports at the top level."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return frozenset(names)


def dotted_module_exists(dotted: str) -> bool:
    """`exporter.a.b` is a module, or `exporter.a.b.name` a name at its top level."""
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        found = module_file(".".join(parts[:k]))
        if found is not None:
            rest = parts[k:]
            return not rest or (len(rest) == 1 and rest[0] in top_level_names(found))
    return False


@cache
def package_index() -> tuple[dict[str, set[str]], dict[str, set[str]], frozenset[str]]:
    """(class -> its members: methods, class attributes, fields and self.x attributes;
    module file stem -> its top-level names; every name defined or imported anywhere in exporter/)."""
    classes: dict[str, set[str]] = {}
    modules: dict[str, set[str]] = {}
    everything: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        stem = path.parent.name if path.name == "__init__.py" else path.stem
        modules.setdefault(stem, set()).update(top_level_names(path))
        everything |= top_level_names(path) | {stem}
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                members = classes.setdefault(node.name, set())
                for item in ast.walk(node):
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        members.add(item.name)
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        members.add(item.target.id)
                    elif isinstance(item, ast.Assign):
                        members |= {t.id for t in item.targets if isinstance(t, ast.Name)}
                    if isinstance(item, (ast.Assign, ast.AnnAssign)):
                        targets = item.targets if isinstance(item, ast.Assign) else [item.target]
                        members |= {t.attr for t in targets if isinstance(t, ast.Attribute)
                                    and isinstance(t.value, ast.Name) and t.value.id == "self"}
                everything |= members
    return classes, modules, frozenset(everything)


def python_name_exists(cited: str) -> bool:
    """`Name`, `Class.member`, `module.name` (a module's file stem: `rules.diagnose`) or `exporter.…`."""
    classes, modules, everything = package_index()
    parts = cited.removesuffix("()").split(".")
    if parts[0] == "exporter" and len(parts) > 1:
        return dotted_module_exists(".".join(parts))
    if len(parts) == 1:
        return parts[0] in everything
    if len(parts) == 2:
        return parts[1] in classes.get(parts[0], set()) or parts[1] in modules.get(parts[0], set())
    return False


def string_constants() -> frozenset[str]:
    found: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        found |= {n.value for n in ast.walk(ast.parse(path.read_text(), str(path)))
                  if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return frozenset(found)


def section(doc_text: str, heading: str) -> str:
    start = doc_text.index(f"\n## {heading}\n")
    end = doc_text.find("\n## ", start + 1)
    return doc_text[start:end if end >= 0 else None]


# ---- the checks themselves can fail ------------------------------------------------------------------------

def test_the_checks_tell_stale_from_current():
    assert py_file_exists("exporter/web/httpd.py") and py_file_exists("sources/nvml/specs.py")
    assert py_file_exists("httpd.py") and not py_file_exists("webconfig.py")
    assert not py_file_exists("exporter/webconfig.py") and not py_file_exists("exporter/collectors.py")
    assert py_file_exists("admission.py")  # bench/ has one too: the package's is meant
    assert not py_file_exists("sources/webconfig.py") and not py_file_exists("fake_nvml.py")
    assert dotted_module_exists("exporter.diagnosis.rules") and dotted_module_exists("exporter.diagnosis")
    assert dotted_module_exists("exporter.fake.nvml.FakeNvml")
    assert not dotted_module_exists("exporter.diagnose_cli") and not dotted_module_exists("exporter.fake_nvml")
    assert not dotted_module_exists("exporter.diagnosis.rules.NoSuchRule")
    assert python_name_exists("Sampler.tick()") and python_name_exists("Sampler.snapshot")
    assert python_name_exists("rules.diagnose") and python_name_exists("COLLECTORS")
    assert not python_name_exists("Sampler.scrape") and not python_name_exists("webconfig.BasicAuth")
    assert not python_name_exists("NoSuchCollector")


# ---- README.md and docs/*.md ------------------------------------------------------------------------------

@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_python_file_named_exists(doc):
    cited = set(PY_FILE.findall(text(doc)))
    missing = sorted(c for c in cited if not py_file_exists(c))
    assert not missing, f"{doc.name} names Python files that do not exist (or bare names that are ambiguous): {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_folder_named_exists(doc):
    """A code span that is a folder (`exporter/pipeline/`, `sources/nvml/`, `deploy/base/`)."""
    cited = {s for s in CODE_SPAN.findall(prose(text(doc))) if re.fullmatch(r"[\w.-]+(?:/[\w.-]+)*/", s)}
    missing = sorted(c for c in cited if not ((REPO / c).is_dir() or (PACKAGE / c).is_dir()))
    assert not missing, f"{doc.name} names folders that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_exporter_module_named_exists(doc):
    cited = {m for span in CODE_SPAN.findall(prose(text(doc))) for m in DOTTED_MODULE.findall(span)}
    cited |= set(DOTTED_MODULE.findall(" ".join(FENCE.findall(text(doc)))))
    missing = sorted(c for c in cited if not dotted_module_exists(c))
    assert not missing, f"{doc.name} names modules (or module attributes) that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_between_docs_resolve(doc):
    targets = re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", text(doc))
    missing = sorted(t for t in targets if not t.startswith("http") and not (doc.parent / t).is_file())
    assert not missing, f"{doc.name} links to missing files: {missing}"


# ---- docs/architecture.md -----------------------------------------------------------------------------------

def test_architecture_cites_only_names_that_exist():
    doc = text(ARCHITECTURE)
    threads = section(doc, "Threads")
    spans = CODE_SPAN.findall(prose(doc.replace(threads, "")))
    cited = {s for s in spans if PYTHON_NAME.fullmatch(s) and not s.startswith(METRIC_PREFIXES)
             and not s.endswith(".py")}
    # The diagram: CamelCase class names and dotted calls such as rules.diagnose or Sampler.tick().
    diagram = " ".join(FENCE.findall(doc))
    cited |= set(re.findall(r"\b_?[A-Z][a-z0-9]+[A-Z]\w*\b", diagram))
    cited |= {m for m in re.findall(r"\b_?[A-Za-z]\w*\.[a-z_]\w*(?=\()", diagram)}
    cited |= {m for m in re.findall(r"\b[a-z]\w*\.(?:[A-Z]\w*|[a-z_]\w*_\w*)\b", diagram) if ".py" not in m}
    assert len(cited) > 60, sorted(cited)  # the page cites plenty: the patterns still find them
    missing = sorted(c for c in cited if not python_name_exists(c))
    assert not missing, f"docs/architecture.md cites names that exist nowhere in exporter/: {missing}"


def test_architecture_threads_are_the_threads_started():
    names = re.findall(r"^\| `([\w-]+)`(?: \(pool\))?(?:, `([\w-]+)`)? \|", section(text(ARCHITECTURE), "Threads"), re.M)
    cited = {n for row in names for n in row if n}
    assert len(cited) >= 9, cited
    missing = sorted(cited - string_constants())
    assert not missing, f"docs/architecture.md lists threads no code names: {missing}"


def test_architecture_layers_are_those_the_import_test_enforces():
    """The page's order of the parts is tests/test_imports.py's LAYERS, top to bottom."""
    from tests.test_imports import LAYERS

    order = re.search(r"Top to bottom: (.*?), then the leaf helpers", text(ARCHITECTURE), re.S)
    assert order is not None
    parts = [p.strip("` ") for p in re.split(r",|\band\b", order.group(1).replace("\n", " ")) if p.strip("` ")]
    named = [p for p in parts if p.endswith("/") or p == "cli.py"]
    expected = ["cli.py" if layer == "exporter.cli" else layer.removeprefix("exporter.") + "/" for layer in LAYERS]
    assert named == expected, (named, expected)
