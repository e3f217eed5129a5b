"""dvc.yaml lists every project file a stage's code imports, so `dvc repro` re-runs a stage
when any code its output depends on changes; and imports flow one way between layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
NOT_OUTPUT_RELEVANT = {"hemaflow/config.py", "hemaflow/progress.py"}  # params tracked per key; progress only reports
LAYERS = {"hemaflow": 0, "tasks": 1, "flows": 2}  # core <- stages <- flows (CLI included)


def _file_of(module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] != "hemaflow":
        return None
    if len(parts) > 1 and parts[1] in ("tasks", "flows"):
        base = ROOT / parts[1] / Path(*parts[2:]) if len(parts) > 2 else ROOT / parts[1]
    else:
        base = ROOT / Path(*parts)
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _imports(path: Path) -> set[Path]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found |= {f for f in map(_file_of, names) if f is not None}
    return found


def _closure(path: Path) -> set[Path]:
    seen, todo = {path}, [path]
    while todo:
        for dep in _imports(todo.pop()) - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def _covered(rel: str, deps: list[str]) -> bool:
    return any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps)


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_dvc_yaml_lists_every_file_the_stage_imports(stage):
    deps = [d for d in STAGES[stage]["deps"] if "${" not in d]
    needed = {p.relative_to(ROOT).as_posix() for p in _closure(ROOT / "tasks" / f"{stage}.py")}
    missing = sorted(r for r in needed - NOT_OUTPUT_RELEVANT if not _covered(r, deps))
    assert not missing, f"dvc.yaml stage {stage} misses deps: {missing}"


def test_imports_flow_one_way():
    upward = []
    for folder, layer in LAYERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            for dep in _imports(path):
                top = dep.relative_to(ROOT).parts[0]
                if LAYERS.get(top, 0) > layer:
                    upward.append(f"{path.relative_to(ROOT)} -> {dep.relative_to(ROOT)}")
    assert not upward, "imports against the layering core <- tasks <- flows:\n" + "\n".join(upward)
