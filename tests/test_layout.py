"""The architecture rule the tree shows: what imports TensorFlow lives in worker/engine/, and the API never walks in.

Checked two ways: statically (no module of `service/` names `worker.engine`, TensorFlow, Keras or matplotlib,
even inside a function; no import cycle among the project's modules) and by running it (importing the API
loads none of them).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENGINE_ONLY = ("tensorflow", "keras", "matplotlib", "worker.engine")
#: The API's one deliberate exception: a model without a .tflite export is served by Keras, imported lazily.
KERAS_FALLBACK = ROOT / "service" / "serving" / "runners.py"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _project_modules() -> dict[str, Path]:
    return {_module_name(p): p for package in ("service", "worker") for p in (ROOT / package).rglob("*.py")}


def _is_within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("path", sorted((ROOT / "service").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_service_module_reaches_the_engine(path: Path) -> None:
    allowed = {"tensorflow", "keras"} if path == KERAS_FALLBACK else set()
    reached = sorted(name for name in _imports(path, top_level_only=False)
                     if any(_is_within(name, banned) for banned in ENGINE_ONLY if banned not in allowed))
    assert not reached, f"{path.relative_to(ROOT)} imports {reached}: the API must stay free of the engine"


def test_the_shared_contract_imports_no_tensorflow_at_module_level() -> None:
    offenders = {}
    for name, path in _project_modules().items():
        if _is_within(name, "worker.engine") or not _is_within(name, "worker"):
            continue
        reached = sorted(n for n in _imports(path, top_level_only=True)
                         if any(_is_within(n, banned) for banned in ENGINE_ONLY))
        if reached and name != "worker.cli":  # the command line is the engine's own front door
            offenders[name] = reached
    assert not offenders, offenders


def test_no_import_cycle_among_the_project_modules() -> None:
    modules = _project_modules()
    graph = {name: {m for m in (_resolve(i, modules) for i in _imports(path, top_level_only=False)) if m and m != name}
             for name, path in modules.items()}
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def _resolve(imported: str, modules: dict[str, Path]) -> str | None:
    """The project module an import names (`worker.store.ModelStore` -> `worker.store`), if any."""
    while imported:
        if imported in modules:
            return imported
        imported = imported.rpartition(".")[0]
    return None


def test_importing_and_serving_the_api_loads_no_engine_module(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "from service.main import create_app\n"
        "from worker.config import Settings\n"
        f"settings = Settings(redis_url='redis://127.0.0.1:1/0', artifact_dir={str(tmp_path)!r})\n"
        "with TestClient(create_app(settings)) as client:\n"
        "    assert client.get('/v1/models').status_code == 200\n"
        "    assert client.get('/healthz').status_code == 200\n"
        f"banned = {ENGINE_ONLY!r}\n"
        "print(sorted(m for m in sys.modules if any(m == b or m.startswith(b + '.') for b in banned)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
