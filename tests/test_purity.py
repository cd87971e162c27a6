"""The pure core imports no I/O library: no asyncio, aiohttp, redis or yarl (STYLE.md, issue 13).

Each pure module is imported in a fresh interpreter, and then `sys.modules` must
hold none of those libraries, whatever the module imports in turn. A pure module
may name `tether.clock` (the time edge, which imports asyncio) only under
`TYPE_CHECKING`; this test catches a run-time import of it too.

tether's package `__init__` files re-export the application (`tether/__init__.py`
imports `tether.app`, hence aiohttp), so each module is first imported with those
`__init__` files left out: that is what the module itself pulls in. A second
test imports the core the ordinary way, as a user does.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.support import ROOT

FORBIDDEN = ("asyncio", "aiohttp", "redis", "yarl")

# The modules that say they are pure or do no I/O (their docstrings), and the
# data modules the core is made of. Left out on purpose: tether.clock (the time
# edge), tether.logs (writes to streams), tether.stream and tether.server (the
# aiohttp edge), tether.inbound, tether.fanout, tether.pulse and tether.views
# (the hub's rooms, on the clock).
PURE = [
    "tether.wire",  # "with no I/O": client bytes in, events out
    "tether.frames",  # bytes out: the server's frames, encoded once
    "tether.heartbeat",  # "with no I/O"
    "tether.registry",  # "with no I/O"
    "tether.outbox",  # "No I/O of its own ... Nothing here imports asyncio"
    "tether.history",  # "with no I/O"
    "tether.limits",  # "pure decisions"
    "tether.idempotency",  # "Pure: KeyMemory ... imports no I/O"
    "tether.proxies",  # "Pure: strings in, a string out; no aiohttp"
    "tether.message",
    "tether.codes",
    "tether.client.logic",
]

SCRIPT = """
import importlib, importlib.util, json, pathlib, sys, types
module, forbidden, without_inits = sys.argv[1], set(sys.argv[2].split(",")), sys.argv[3] == "1"

def loaded():
    return sorted({name.split(".")[0] for name in sys.modules} & forbidden)

before = loaded()
if without_inits:  # each tether package as a bare namespace: its __init__ does not run
    root = pathlib.Path(importlib.util.find_spec("tether").submodule_search_locations[0])
    for init in root.rglob("__init__.py"):
        name = ".".join(("tether", *init.parent.relative_to(root).parts))
        package = types.ModuleType(name)
        package.__path__ = [str(init.parent)]
        sys.modules[name] = package
for name in module.split(" "):
    importlib.import_module(name)
print(json.dumps({"before": before, "after": loaded()}))
"""


def io_libraries_loaded(modules: list[str], without_inits: bool) -> list[str]:
    """The forbidden libraries in `sys.modules` of a fresh interpreter after importing `modules`."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, " ".join(modules), ",".join(FORBIDDEN),
         "1" if without_inits else "0"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["before"] == [], f"the interpreter loaded {result['before']} by itself"
    after: list[str] = result["after"]
    return after


@pytest.mark.parametrize("module", PURE)
def test_a_pure_module_imports_no_io_library(module: str) -> None:
    loaded = io_libraries_loaded([module], without_inits=True)
    assert loaded == [], (
        f"{module} (or a module it imports) loads {loaded} at run time; a pure module may "
        f"name them, and tether.clock, only under TYPE_CHECKING")


def test_the_pure_core_imports_no_io_library_the_ordinary_way() -> None:
    modules = list(PURE)
    loaded = io_libraries_loaded(modules, without_inits=False)
    assert loaded == [], f"importing the pure core loads {loaded}"
