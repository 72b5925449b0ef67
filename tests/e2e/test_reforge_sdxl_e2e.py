"""End-to-end SDXL: the extension inside a real reForge, driven through its HTTP API (tests in fork_sdxl_e2e.py).

Runs only when REFORGE_PATH names a reForge install (REFORGE_PYTHON: its python, default $REFORGE_PATH/venv/bin/python);
CI has none, so the module is skipped there. One fork per pytest run; an SDXL fork process holds ~16–20 GiB:

    REFORGE_PATH=/path/to/reforge REFORGE_PYTHON=/path/to/venv/bin/python python -m pytest -q tests/e2e/test_reforge_sdxl_e2e.py -s
"""

import pytest

from . import fork_e2e

if fork_e2e.FORK is not None and fork_e2e.FORK.name != "reForge":
    pytest.skip(f"this run tests {fork_e2e.FORK.name}; run reForge's end-to-end tests in a pytest run of their own", allow_module_level=True)
fork_e2e.FORK = fork_e2e.Fork("reForge", "REFORGE_PATH", "REFORGE_PYTHON", ("ldm_patched", "modules_forge"))
_SKIP = fork_e2e.FORK.skip_reason()
if _SKIP:
    fork_e2e.FORK = None
    pytest.skip(_SKIP, allow_module_level=True)

from .fork_sdxl_e2e import *  # noqa: E402,F401,F403 (the shared tests and fixtures)
