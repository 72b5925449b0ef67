"""End-to-end SDXL: the extension inside a real Forge, driven through its HTTP API (tests in fork_sdxl_e2e.py).

Runs only when FORGE_PATH names a Forge install (FORGE_PYTHON: its python, default $FORGE_PATH/venv/bin/python);
CI has none, so the module is skipped there. One fork per pytest run; an SDXL fork process holds ~16–20 GiB:

    FORGE_PATH=/path/to/reforge FORGE_PYTHON=/path/to/venv/bin/python python -m pytest -q tests/e2e/test_forge_sdxl_e2e.py -s
"""

import pytest

from . import fork_e2e

if fork_e2e.FORK is not None and fork_e2e.FORK.name != "Forge":
    pytest.skip(f"this run tests {fork_e2e.FORK.name}; run Forge's end-to-end tests in a pytest run of their own", allow_module_level=True)
fork_e2e.FORK = fork_e2e.Fork("Forge", "FORGE_PATH", "FORGE_PYTHON", ("backend", "modules_forge"))
_SKIP = fork_e2e.FORK.skip_reason()
if _SKIP:
    fork_e2e.FORK = None
    pytest.skip(_SKIP, allow_module_level=True)

from .fork_sdxl_e2e import *  # noqa: E402,F401,F403 (the shared tests and fixtures)
