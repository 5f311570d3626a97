"""The house's floors: every import inside src/sparkee (at module level or inside a function) goes
down or sideways, never up, and there is no import cycle. docs/development.md draws the floors.

Read from the source with `ast`, so an import hidden in a function counts like any other; only
imports under `if TYPE_CHECKING:` (annotations, never run) are left out.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "sparkee"

# lowest first; a module may import its own floor or lower ones. A package listed by name covers
# its submodules unless one is listed itself.
FLOORS: list[tuple[str, ...]] = [
    ("errors", "syntax", "progress", "store", "plugin", "scoring", "sources"),  # leaves
    ("schedule", "accept", "refslm"),  # pure specs; the reference SLM's own files
    ("config",),  # GenerationConfig and the pooling spec, over the specs below it
    ("pooling", "hf", "cache", "compiled", "kernels", "scripted", "models"),  # tensors, transformers, formats
    ("backbone",),
    (
        "heads",
        "evidence",
        "cost",
        "trace",
        "stats",
    ),  # exit heads, a rule's evidence, the meter, records, stats
    ("engine",),  # the step-able engine and the decode loop
    ("calibrate",),  # measures a machine by running the engine
    ("generate",),  # generate / stream / generate_batch over the engine
    ("export", "labels", "eval", "analysis"),
    ("profiles",),
    ("train_heads", "serve", "integrations", "__init__"),
    ("cli", "options", "models.cli", "refslm.cli"),  # the command line: its options, its command groups
]
# never import torch or transformers (store, sources and refslm.train, low as they are, do)
PURE = ("errors", "syntax", "schedule", "accept", "config", "scoring", "plugin")


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported sparkee module relative to the package, line) for every import in the file."""
    name = _module_name(path)
    pkg = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    if name == "__init__":
        pkg = []
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for stmt in block.body
        for n in ast.walk(stmt)
    }
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)]
            elif (node.module or "").startswith("sparkee"):
                base = []
                node_module = node.module.split(".", 1)[1] if "." in node.module else ""
                out += [(m, node.lineno) for m in _targets(base, node_module, node.names)]
                continue
            else:
                continue
            out += [(m, node.lineno) for m in _targets(base, node.module, node.names)]
        elif isinstance(node, ast.Import):
            out += [
                (a.name.split(".", 1)[1], node.lineno) for a in node.names if a.name.startswith("sparkee.")
            ]
    return out


def _targets(base: list[str], module: str | None, names) -> list[str]:
    if module:
        mod = ".".join([*base, module])
        # `from .pkg import sub` imports a submodule when one exists
        return [mod] + [f"{mod}.{a.name}" for a in names if _exists(f"{mod}.{a.name}")]
    return [".".join([*base, a.name]) for a in names if _exists(".".join([*base, a.name]))]


def _exists(mod: str) -> bool:
    p = SRC.joinpath(*mod.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def _floor(mod: str) -> int:
    parts = mod.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        for i, floor in enumerate(FLOORS):
            if key in floor:
                return i
    raise AssertionError(f"module {mod} is on no floor: add it to FLOORS in tests/test_architecture.py")


def _graph() -> dict[str, list[tuple[str, int]]]:
    return {_module_name(p): _imports(p) for p in sorted(SRC.rglob("*.py"))}


def test_every_module_has_a_floor():
    for mod in _graph():
        _floor(mod)


def test_imports_go_down_never_up():
    upward = []
    for mod, imports in _graph().items():
        for target, line in imports:
            same_package = target.split(".")[0] == mod.split(".")[0]
            if not same_package and _floor(target) > _floor(mod):
                upward.append(f"{mod}:{line} imports {target}")
    assert not upward, "imports that go up a floor:\n" + "\n".join(upward)


def test_no_import_cycle():
    graph = {m: {t for t, _ in imps if t != m} for m, imps in _graph().items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycle = path[path.index(t) :] + [t] if t in path else [m, t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("mod", PURE)
def test_pure_modules_do_not_touch_torch(mod):
    path = SRC / f"{mod}.py"
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        assert not any(n.split(".")[0] in ("torch", "transformers") for n in names), f"{mod} imports {names}"


def test_pure_modules_import_only_pure_modules():
    # a pure spec that imports a module holding tensors would pull torch in after all
    graph = _graph()
    impure = [f"{m}:{line} imports {t}" for m in PURE for t, line in graph[m] if t not in PURE]
    assert not impure, "pure modules importing others:\n" + "\n".join(impure)


def test_the_checker_sees_an_upward_import_inside_a_function(tmp_path, monkeypatch):
    # the checker itself can fail: a function-level import of the top floor from the engine floor
    fake = tmp_path / "sparkee"
    fake.mkdir()
    (fake / "cli.py").write_text("")
    (fake / "cost.py").write_text("def f():\n    from .cli import main\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", fake)
    graph = _graph()
    assert graph["cost"] == [("cli", 2)]
    assert _floor("cli") > _floor("cost")
