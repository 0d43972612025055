"""Imports only go downward: each module of the package sits on a floor and imports from its
own floor or below. A new module must be given a floor here: deciding where it sits is the point.
"""

import ast
from pathlib import Path

import selfsup

# Lowest first. A module's floor is that of the longest prefix listed.
FLOORS = [
    # ground: what everything shares; depends on nothing else in the package
    ["selfsup.registry", "selfsup.step", "selfsup.params", "selfsup.schedules", "selfsup.dist",
     "selfsup.files", "selfsup.extras"],
    # parts: data, views, backbones, heads, losses, target branches, negatives, plots, the
    # pure probes of features (the engine's kNN monitor and collapse guard use them), and the
    # parts of a loss's gradient (each method's gradient_terms uses them)
    ["selfsup.data", "selfsup.augment", "selfsup.backbones", "selfsup.heads", "selfsup.losses",
     "selfsup.target", "selfsup.negatives", "selfsup.prototypes", "selfsup.plot",
     "selfsup.probes", "selfsup.decomposition"],
    # methods: compositions of parts
    ["selfsup.methods"],
    # assembly: config validated against the registries, parts built from it, the run folder
    ["selfsup.config", "selfsup.build", "selfsup.run"],
    # the engine: the loop for every task
    ["selfsup.engine"],
    # commands that measure a finished run: evaluation protocols, stage-wise probes, gradient
    # decomposition and feature statistics of a checkpoint, embedding, export, the report
    ["selfsup.eval", "selfsup.report"],
    # studies that train runs and compare them (compare, semantic gap, momentum encoder, demo)
    ["selfsup.studies"],
    # entry points
    ["selfsup.cli", "selfsup.__main__", "selfsup"],
]  # fmt: skip


def floor(module: str) -> int:
    matches = [
        (len(prefix), level)
        for level, prefixes in enumerate(FLOORS)
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    assert matches, f"{module} has no floor: add it to FLOORS in {__file__}"
    return max(matches)[1]


def modules() -> dict[str, Path]:
    root = Path(selfsup.__file__).parent
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(path: Path) -> set[str]:
    """Every selfsup module imported anywhere in the file, function bodies included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    known = modules()
    return {name for name in found if name in known}


def test_every_import_in_the_package_goes_to_the_same_floor_or_below():
    upward = [
        f"{module} (floor {floor(module)}) imports {target} (floor {floor(target)})"
        for module, path in sorted(modules().items())
        for target in sorted(imports(path))
        if floor(target) > floor(module)
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_layering_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from selfsup.engine.train import train\n")
    assert "selfsup.engine.train" in imports(bad)
    assert floor("selfsup.engine.train") > floor("selfsup.methods.moco")
