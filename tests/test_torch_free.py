"""`models`, `edge` and `server` never load torch, not even transitively, and the service stays in its room:
checked in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CHECK = """
import importlib, json, pkgutil, sys
names = {names!r}
for name in names:
    module = importlib.import_module(name)
    if {walk!r} and hasattr(module, "__path__"):
        for info in pkgutil.walk_packages(module.__path__, name + "."):
            importlib.import_module(info.name)
print(json.dumps({{"torch": "torch" in sys.modules, "training": "training" in sys.modules,
                   "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("models", "edge", "server"))}}))
"""


def imported_in_fresh_interpreter(names: list[str], walk: bool) -> dict[str, object]:
    code = CHECK.format(names=names, walk=walk)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("names", [
    ["models", "models.runtime", "models.release", "models.gate", "models.lineage", "models.cli"],
    ["edge"],
    ["server"],
])
def test_the_named_modules_load_no_torch(names: list[str]) -> None:
    result = imported_in_fresh_interpreter(names, walk=False)
    assert result["torch"] is False and result["training"] is False
    assert set(names) <= set(result["loaded"])  # type: ignore[arg-type]


def test_no_module_of_models_edge_or_server_loads_torch() -> None:
    result = imported_in_fresh_interpreter(["models", "edge", "server"], walk=True)
    assert result["torch"] is False and result["training"] is False
    assert {"models.runtime", "edge.cli", "server.cli"} <= set(result["loaded"])  # type: ignore[arg-type]


def test_the_check_itself_sees_torch_when_it_is_loaded() -> None:
    assert imported_in_fresh_interpreter(["training.export"], walk=False)["torch"] is True


SERVICE_CHECK = """
import importlib, json, pathlib, sys
import server
root = pathlib.Path(server.__file__).parent
for path in sorted(root.rglob("*.py")):
    name = ".".join(("server", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
    if name != "server.cli" and not name.startswith("server.bench"):
        importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "edge" or m.startswith("server.bench")
                        or m == "server.cli")))
"""


def test_the_service_imports_neither_edge_nor_the_benchmark_wing() -> None:
    done = subprocess.run([sys.executable, "-c", SERVICE_CHECK], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
