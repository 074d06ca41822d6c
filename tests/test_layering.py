"""The floors of the code base (docs/architecture.md §13), checked on the source.

    cluster/                                   top: may import anything
    workers/                                   imports workers, router, kernels, encoding, protos
    router/                                    imports router, kernels, encoding, protos
    kernels/   encoding/   protos/             bottom: each imports only itself

Every `import` / `from ... import` anywhere in a module counts for the floors and for `ray`
(inside functions and `if TYPE_CHECKING:` blocks too: a lazy import still runs up a floor).
Cycles are looked for among the imports that run when a module is imported: an import
inside a function is a deliberate lazy import, and one under `if TYPE_CHECKING:` never
runs (the idiom for type hints that would otherwise close a cycle), so neither can close a
cycle at import time. Nothing here imports the project: reading the source takes a
fraction of a second.

The repository documents itself: no file points at the design notes outside it.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "encoding", "protos", "router", "workers", "cluster")
BOTTOM = ("kernels", "encoding", "protos")
# package -> the project packages its modules may import (None: any)
ALLOWED: dict[str, frozenset[str] | None] = {
    "kernels": frozenset({"kernels"}),
    "encoding": frozenset({"encoding"}),
    "protos": frozenset({"protos"}),
    "router": frozenset({"router", *BOTTOM}),
    "workers": frozenset({"workers", "router", *BOTTOM}),
    "cluster": None,
}
RAY_HOME = "cluster"  # the only package that may import ray
GENERATED = re.compile(r"_pb2(_grpc)?\.pyi?$")


@dataclass(frozen=True)
class Imp:
    line: int  # line of the import statement
    target: str  # absolute dotted name, resolved to the deepest project module it names
    top_level: bool  # runs when the module is imported: not inside a function / lambda nor `if TYPE_CHECKING:`


# ---------------------------------------------------------------- reading the source


def module_name(rel: Path) -> str:
    """'workers/step.py' -> 'workers.step'; 'cluster/engine/__init__.py' -> 'cluster.engine'."""
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files(root: Path = ROOT) -> dict[str, Path]:
    """module name -> path (relative to root) of every module of the six packages."""
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root)
            if "__pycache__" in rel.parts or GENERATED.search(rel.name):
                continue
            out[module_name(rel)] = rel
    return out


def _resolve(name: str, known: set[str], base: str = "") -> str:
    """The longest prefix of dotted `name` that is a project module (or is `base`, the module
    a `from base import name` names), else `name` itself."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in known or prefix == base:
            return prefix
    return name


def _base_of_relative(module: str, is_package: bool, level: int, mod: str | None) -> str:
    package = module.split(".") if is_package else module.split(".")[:-1]
    keep = len(package) - (level - 1)
    assert keep >= 0, f"relative import beyond the top of {module}"
    return ".".join(package[:keep] + ([mod] if mod else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(tree: ast.AST) -> Iterator[tuple[ast.AST, bool]]:
    """Every node, with whether it is lazy: inside a function or lambda (runs when called) or
    the body of an `if TYPE_CHECKING:` (never runs). Iterative: a module is thousands of nodes."""
    stack: list[tuple[ast.AST, bool]] = [(tree, False)]
    while stack:
        node, lazy = stack.pop()
        yield node, lazy
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend((child, True) for child in node.body)
            stack.extend((child, lazy) for child in node.orelse)
            continue
        nested = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        stack.extend((child, nested) for child in ast.iter_child_nodes(node))


def imports_of(source: str, module: str, is_package: bool, modules: Iterable[str]) -> list[Imp]:
    """Every import in `source` (the text of `module`), targets absolute and resolved."""
    known = set(modules)
    out: list[Imp] = []
    for node, lazy in _walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [_resolve(a.name, known) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _base_of_relative(module, is_package, node.level, node.module)
            # `from pkg import mod` names the submodule when there is one
            targets = [_resolve(f"{base}.{a.name}" if base else a.name, known, base) for a in node.names]
        else:
            continue
        out.extend(Imp(node.lineno, t, not lazy) for t in dict.fromkeys(targets))
    return sorted(out, key=lambda i: i.line)  # (stable: names of one statement keep their order)


# ---------------------------------------------------------------- the three rules


def floor_offences(rel: str, imps: Iterable[Imp]) -> list[str]:
    """`path:line imports X` for each import of a project package above rel's floor."""
    allowed = ALLOWED[rel.split("/")[0]]
    if allowed is None:
        return []
    return [f"{rel}:{i.line} imports {i.target}" for i in imps
            if i.target.split(".")[0] in PACKAGES and i.target.split(".")[0] not in allowed]


def ray_offences(rel: str, imps: Iterable[Imp]) -> list[str]:
    if rel.split("/")[0] == RAY_HOME:
        return []
    return [f"{rel}:{i.line} imports {i.target}" for i in imps if i.target.split(".")[0] == "ray"]


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one node, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            nxt = next((e for e in edges if e in graph), None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
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
                    found.append(sorted(component))
    return sorted(found)


def import_graph(all_imports: dict[str, list[Imp]]) -> dict[str, set[str]]:
    """module -> the project modules it imports at import time (`Imp.top_level`)."""
    return {m: {i.target for i in imps if i.top_level and i.target in all_imports and i.target != m}
            for m, imps in all_imports.items()}


def cycle_offences(all_imports: dict[str, list[Imp]], files: dict[str, Path]) -> list[str]:
    out = []
    graph = import_graph(all_imports)
    for component in strongly_connected(graph):
        members = set(component)
        edges = [f"  {files[m].as_posix()}:{i.line} imports {i.target}"
                 for m in component for i in all_imports[m] if i.top_level and i.target in members]
        out.append("cycle: " + " <-> ".join(component) + "\n" + "\n".join(edges))
    return out


# ---------------------------------------------------------------- the tree as it is


def _scan(root: Path = ROOT) -> tuple[dict[str, Path], dict[str, list[Imp]]]:
    files = project_files(root)
    imps = {m: imports_of((root / rel).read_text(encoding="utf-8"), m, rel.name == "__init__.py", files)
            for m, rel in files.items()}
    return files, imps


FILES, IMPORTS = _scan()


def _report(title: str, offences: list[str]) -> str:
    return f"{title} ({len(offences)}):\n" + "\n".join(offences)


def test_the_packages_are_found():
    # a checker that reads nothing passes everything
    assert {m.split(".")[0] for m in FILES} == set(PACKAGES)
    assert len(FILES) > 50 and sum(len(v) for v in IMPORTS.values()) > 300


def test_no_import_runs_up_the_floors():
    offences = [o for m, rel in FILES.items() for o in floor_offences(rel.as_posix(), IMPORTS[m])]
    assert not offences, _report("imports above their floor", offences)


def test_ray_is_imported_only_under_cluster():
    offences = [o for m, rel in FILES.items() for o in ray_offences(rel.as_posix(), IMPORTS[m])]
    assert not offences, _report("ray outside cluster/", offences)


def test_no_import_cycles():
    offences = cycle_offences(IMPORTS, FILES)
    assert not offences, _report("import cycles (among the imports that run at import time)", offences)


# ---------------------------------------------------------------- the checkers can fail

FAKE_MODULES = {"workers", "workers.step", "workers.ep", "router", "router.gate", "router.sub",
                "router.sub.deep", "cluster", "cluster.engine", "cluster.engine.loop", "kernels", "kernels.quant"}


def _fake(rel: str, source: str) -> list[Imp]:
    module = module_name(Path(rel))
    return imports_of(source, module, rel.endswith("__init__.py"), FAKE_MODULES)


def test_floor_checker_reports_every_kind_of_upward_import():
    source = (
        "from __future__ import annotations\n"
        "import os\n"
        "from typing import TYPE_CHECKING\n"
        "import kernels.quant\n"  # 4: allowed
        "if TYPE_CHECKING:\n"
        "    from cluster.engine import Engine\n"  # 6
        "def lazy():\n"
        "    import workers.ep\n"  # 8
        "    from ... import workers\n"  # 9: relative, resolves to the package
        "from ...cluster.engine import loop\n"  # 10: relative, resolves to the submodule
        "from . import gate\n"  # 11: allowed (router.sub)
        "class C:\n"
        "    from workers import step as s\n"  # 13
    )
    found = floor_offences("router/sub/mod.py", _fake("router/sub/mod.py", source))
    assert found == [
        "router/sub/mod.py:6 imports cluster.engine",
        "router/sub/mod.py:8 imports workers.ep",
        "router/sub/mod.py:9 imports workers",
        "router/sub/mod.py:10 imports cluster.engine.loop",
        "router/sub/mod.py:13 imports workers.step",
    ]
    assert floor_offences("cluster/sub/mod.py", _fake("cluster/sub/mod.py", source)) == []
    assert floor_offences("kernels/k.py", _fake("kernels/k.py", "from router.gate import route\n")) == [
        "kernels/k.py:1 imports router.gate"]


def test_relative_imports_resolve_from_a_package_init():
    imps = _fake("router/sub/__init__.py", "from . import deep\nfrom .. import gate\nfrom ...workers import ep\n")
    assert [i.target for i in imps] == ["router.sub.deep", "router.gate", "workers.ep"]


def test_ray_checker_reports_ray_outside_cluster():
    source = "import ray\ndef f():\n    from ray.util import placement_group\nimport rayon\nimport ray.actor as a\n"
    assert ray_offences("workers/w.py", _fake("workers/w.py", source)) == [
        "workers/w.py:1 imports ray", "workers/w.py:3 imports ray.util", "workers/w.py:5 imports ray.actor"]
    assert ray_offences("cluster/backends/ray.py", _fake("cluster/backends/ray.py", source)) == []


def test_cycle_checker_finds_module_level_cycles_only():
    sources = {
        "workers/step.py": "from workers import ep\nfrom typing import TYPE_CHECKING\n"
                           "if TYPE_CHECKING:\n    from router.gate import f\nelse:\n    import os\n",
        "workers/ep.py": "import workers.step\n",  # closes step <-> ep
        "router/gate.py": "def f():\n    import kernels.quant\n"  # lazy: no edge
                          "import typing\nif typing.TYPE_CHECKING:\n    import workers.step\n",  # type only: no edge
        "kernels/quant.py": "from router.gate import f\n",
        "cluster/engine/__init__.py": "from .loop import run\n",
        "cluster/engine/loop.py": "from cluster.engine import Engine\n",  # package <-> submodule
    }
    imps = {module_name(Path(rel)): _fake(rel, src) for rel, src in sources.items()}
    files = {module_name(Path(rel)): Path(rel) for rel in sources}
    assert strongly_connected(import_graph(imps)) == [["cluster.engine", "cluster.engine.loop"],
                                                      ["workers.ep", "workers.step"]]
    report = cycle_offences(imps, files)
    assert report[1].startswith("cycle: workers.ep <-> workers.step")
    assert "workers/ep.py:1 imports workers.step" in report[1]
    assert [i.top_level for i in imps["workers.step"]] == [True, True, False, True]
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


# ---------------------------------------------------------------- the repo documents itself

TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".proto", ".sh", ".toml", ".cfg", ".ini"}
SKIP_DIRS = {".venv", ".git", "__pycache__", ".pytest_cache", ".ruff_cache", "build", "dist", "node_modules"}
# Built from pieces so that this file does not match itself.
_SPEC, _DESIGN, _STYLE, _NOTES, _SIGN = "SP" + "EC", "DES" + "IGN", "ST" + "YLE", "MACHINE" + "-NOTES", "\u00a7"
OUTSIDE_POINTERS = re.compile("|".join([
    re.escape(".." + "/shared"), re.escape("/work" + "/shared"),
    # the notes outside the repo, by file name
    rf"\b(?:{_SPEC}-dsv4|{_DESIGN}|{_STYLE})\.md\b", rf"\b{_NOTES}\b",
    # the old citation forms: one of those names, then a section sign, "section N" or a bare
    # number (the docs in the repo are cited by path: docs/model.md, then the sign and number)
    rf"\b(?:{_SPEC}|{_DESIGN}|{_STYLE})(?:-dsv4)?(?:\.md)?(?:\s*{_SIGN}|\s+section\s+\d|\s+\d)[\d.]*",
]))


def text_files(root: Path = ROOT) -> Iterator[Path]:
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(names):
            path = Path(folder) / name
            if GENERATED.search(name) or not path.is_file():
                continue
            if path.suffix in TEXT_SUFFIXES or (not path.suffix and path.read_bytes()[:2] == b"#!"):
                yield path


def pointer_offences(rel: str, text: str) -> list[str]:
    return [f"{rel}:{text.count(chr(10), 0, m.start()) + 1} mentions {' '.join(m.group(0).split())!r}"
            for m in OUTSIDE_POINTERS.finditer(text)]


def test_no_file_points_outside_the_repo():
    offences = [o for path in text_files()
                for o in pointer_offences(path.relative_to(ROOT).as_posix(), path.read_text(errors="replace"))]
    assert not offences, _report("pointers to notes outside the repo (cite docs/model.md or docs/architecture.md)",
                                 offences)


def test_pointer_checker_reports_each_form():
    spec, design, style, notes, sign = _SPEC, _DESIGN, _STYLE, _NOTES, _SIGN
    text = (f"see ..{'/'}shared/{design}.md\n"  # 1: two offences
            + f"PRO = Path('/work{'/'}shared/x.json')\n"  # 2
            + f"({spec} {sign}4.3) and {design} {sign}2\n"  # 3: two
            + f"{spec}-dsv4 {sign}1, {spec} section 12, ({style} 5)\n"  # 4: three
            + f"official parser ({spec}\n11.5), {notes}\n"  # 5: across a line break; 6
            + f"docs/model.md {sign}4.3, docs/architecture.md {sign}2, {spec}IAL 5, {design}S\n")  # 7: fine
    found = pointer_offences("x.py", text)
    assert [f.split(" mentions ")[0] for f in found] == [
        "x.py:1", "x.py:1", "x.py:2", "x.py:3", "x.py:3", "x.py:4", "x.py:4", "x.py:4", "x.py:5", "x.py:6"]
    assert found[-2] == f"x.py:5 mentions '{spec} 11.5'"
    assert {p.relative_to(ROOT).as_posix() for p in text_files()} >= {"README.md", "tests/test_layering.py",
                                                                       "pyproject.toml"}
