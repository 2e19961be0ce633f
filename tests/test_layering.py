"""Imports run one way: cli -> commands (train, eval, export, demo, hub) -> config -> models -> data -> base.

A module may import its own layer or any layer below it. Among the commands, training may evaluate (and
the demo trains and evaluates), but evaluation never imports training: what both need (the loss at
labelled positions, gathering sharded weights to generate) lives in `models/`. Every import counts,
including the ones inside functions, so a late import cannot hide an upward arrow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import vlmtune

PACKAGE = Path(vlmtune.__file__).parent

# Lowest first; a module belongs to the first layer with a prefix it matches.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("vlmtune.errors", "vlmtune.compat", "vlmtune.outputs")),
    ("data", ("vlmtune.data",)),
    ("models", ("vlmtune.models",)),
    ("config", ("vlmtune.config",)),
    ("commands", ("vlmtune.train", "vlmtune.eval", "vlmtune.export", "vlmtune.demo", "vlmtune.hub")),
    ("cli", ("vlmtune.cli", "vlmtune.__main__")),
)
# Commands that may use another command: (importer, imported).
# Training and merging upload their result the way `vlmtune push` does (hub.py).
COMMAND_USES = {
    ("vlmtune.train", "vlmtune.eval"),
    ("vlmtune.demo", "vlmtune.train"),
    ("vlmtune.demo", "vlmtune.eval"),
    ("vlmtune.train", "vlmtune.hub"),
    ("vlmtune.export", "vlmtune.hub"),
}


def _matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> tuple[int, str]:
    """(rank, command prefix) of a vlmtune module; the package itself (its version) is base."""
    if module == "vlmtune":
        return 0, ""
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if _matches(module, prefix):
                return rank, prefix
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layering.py")


def module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, module) of every vlmtune module `path` imports (`from . import x` names module `x`)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if _matches(a.name, "vlmtune")]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, node.module] if node.module else base)
            if not _matches(target, "vlmtune"):
                continue
            submodules = [f"{target}.{a.name}" for a in node.names]
            modules = [m for m in submodules if _is_module(m, root)] or [target]
            found += [(node.lineno, m) for m in modules]
    return found


def _is_module(name: str, root: Path) -> bool:
    path = root.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def upward_imports(root: Path = PACKAGE) -> list[str]:
    """One line per import that points up (or sideways between commands not allowed to use each other)."""
    wrong = []
    for path in sorted(root.rglob("*.py")):
        importer = module_name(path, root)
        rank, command = layer_of(importer)
        for line, target in imported(path, root):
            target_rank, target_command = layer_of(target)
            where = f"{path.relative_to(root.parent)}:{line}: {importer} imports {target}"
            if target_rank > rank:
                wrong.append(f"{where} ({LAYERS[rank][0]} must not import {LAYERS[target_rank][0]})")
            elif target_rank == rank and LAYERS[rank][0] == "commands" and command != target_command:
                if (command, target_command) not in COMMAND_USES:
                    wrong.append(f"{where} ({command} must not import {target_command})")
    return wrong


def test_imports_point_down_the_layers():
    wrong = upward_imports()
    assert not wrong, "imports that point up the layers:\n" + "\n".join(wrong)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The checker itself: an upward import written into a module is named with its module and line."""
    fake = tmp_path / "vlmtune"
    (fake / "data").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "data" / "__init__.py").write_text("")
    (fake / "data" / "rows.py").write_text("import json\n\n\ndef f():\n    from ..config import arg\n")
    (fake / "config.py").write_text("")
    assert upward_imports(fake) == [
        "vlmtune/data/rows.py:5: vlmtune.data.rows imports vlmtune.config (data must not import config)"
    ]
