"""The tree shows the two processes: only service/inference/ (and model/, training/) may import torch or onnxruntime.

The event loop's side (service/ outside inference/) names service.inference only inside the functions that start
the model (LocalHandle.start, wire.run_worker), never at module level.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import REPO

HEAVY = ("torch", "onnx", "onnxruntime", "safetensors.torch")


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.If) and top_level_only:  # `if TYPE_CHECKING:` blocks import nothing at run time
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _is(module: str, prefixes: tuple[str, ...] | set[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _heavy_model_modules() -> set[str]:
    """model/ modules that import torch at module level, directly or through another model module."""
    imports = {f"model.{p.stem}": _imports(p, top_level_only=True) for p in (REPO / "model").glob("*.py")}
    heavy = {m for m, deps in imports.items() if any(_is(d, HEAVY) for d in deps)}
    while True:
        more = {m for m, deps in imports.items() if m not in heavy and any(d in heavy for d in deps)}
        if not more:
            return heavy
        heavy |= more


def test_only_the_inference_package_imports_torch_or_onnxruntime() -> None:
    forbidden = {*HEAVY, *_heavy_model_modules(), "service.inference"}
    assert "model.artifact" in forbidden and "model.preprocess" not in forbidden
    offenders = {}
    for path in sorted((REPO / "service").rglob("*.py")):
        if "inference" in path.relative_to(REPO / "service").parts:
            continue
        bad = sorted(m for m in _imports(path, top_level_only=True) if _is(m, forbidden))
        if bad:
            offenders[str(path.relative_to(REPO))] = bad
    assert offenders == {}, "the event loop's process must not import these at module level"


def test_the_event_loop_side_names_the_inference_package_only_where_the_model_starts() -> None:
    lazy = {}
    for path in sorted((REPO / "service").rglob("*.py")):
        if "inference" in path.relative_to(REPO / "service").parts:
            continue
        names = sorted(m for m in _imports(path, top_level_only=False) if _is(m, {"service.inference"}))
        if names:
            lazy[str(path.relative_to(REPO))] = names
    assert lazy == {
        "service/serving/handle.py": ["service.inference.predictor"],
        "service/wire.py": ["service.inference.worker"],
    }


def test_the_inference_package_does_not_reach_back_into_the_event_loop_side() -> None:
    for path in sorted((REPO / "service" / "inference").glob("*.py")):
        back = sorted(
            m
            for m in _imports(path, top_level_only=False)
            if _is(m, {"service.api", "service.http", "service.serving"})
        )
        assert back == [], f"{path.name} imports {back}"


def test_the_artifact_file_names_the_server_knows_are_the_artifacts() -> None:
    from model.artifact import META_FILE
    from service import wire

    assert wire.META_FILE == META_FILE
