"""End-to-end SDXL: the extension inside a real Forge Neo, driven through its HTTP API (tests in
fork_sdxl_e2e.py, with Neo's refusal of lean weights instead of the lean test, plus a measurement).

Runs only when NEO_PATH names a Neo install (NEO_PYTHON: its python, default $NEO_PATH/venv/bin/python);
CI has none, so the module is skipped there. One fork per pytest run; an SDXL process holds ~16–22 GiB:

    NEO_PATH=/path/to/neo/webui python -m pytest -q tests/e2e/test_neo_sdxl_e2e.py -s

Neo has no ldm: put rand-sdxl and rand-sdxl-ft (tests/e2e/make_sdxl_checkpoints.py, run with another
install's python and repositories/) in $NEO_PATH/models/Stable-diffusion beforehand, with the generator's
manifest `.rand-sdxl.json` (symlinks to a shared copy work). How Neo is started: tests/e2e/neo_fork.py.
"""

import pytest

from . import fork_e2e
from .neo_fork import neo_fork

if fork_e2e.FORK is not None and fork_e2e.FORK.name != "Forge Neo":
    pytest.skip(f"this run tests {fork_e2e.FORK.name}; run Neo's end-to-end tests in a pytest run of their own", allow_module_level=True)
fork_e2e.FORK = neo_fork()
_SKIP = fork_e2e.FORK.skip_reason()
if _SKIP:
    fork_e2e.FORK = None
    pytest.skip(_SKIP, allow_module_level=True)

from .fork_sdxl_e2e import *  # noqa: E402,F401,F403 (the shared tests and fixtures)
from . import fork_sdxl_e2e as x  # noqa: E402

del test_lean_is_within_budget_and_closer_to_exact_than_cfg  # noqa: F821 (Neo keeps exact weak weights)

MEASURED = {}


def rss_gib(pid):
    """The process's resident memory now (VmRSS), GiB."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


@pytest.fixture(scope="module")
def disabled(fork):
    """PG disabled, before any PG request: the process's peak memory then is plain Neo's."""
    result = x.timed("disabled", fork_e2e.generate(fork))
    MEASURED["plain: peak RSS"] = x.peak_rss_gib(fork.process.pid)
    MEASURED["plain: RSS after"] = rss_gib(fork.process.pid)
    return result


@pytest.fixture(scope="module")
def pg03(fork, disabled):
    result = x.timed("ω=0.3 (first: weak weights built)", fork_e2e.generate(fork, x.pg(omega=0.3)))
    MEASURED["PG (exact weak weights built): peak RSS"] = x.peak_rss_gib(fork.process.pid)
    MEASURED["PG: RSS after"] = rss_gib(fork.process.pid)
    return result


def test_lean_is_refused_by_name(fork):
    fork_e2e.expect_error(fork, x.pg(omega=0.3, weights="lean"), "lean weak weights", "not supported on Forge Neo")


def test_seconds_per_step_plain_and_with_pg(fork, disabled, pg03):
    """s/step from the difference of an 8-step and a 4-step request (text encoding, VAE and the HTTP
    round trip cancel), plain and with PG's cached weak weights (a first request builds them again if
    another test left other ones); the memories of the process."""
    seconds = {}
    for label, extra in (("plain", {}), ("PG ω=0.3", x.pg(omega=0.3))):
        fork_e2e.generate(fork, extra)  # warm: the weak weights cached, the model loaded
        four = fork_e2e.generate(fork, extra)
        eight = fork_e2e.generate(fork, {**extra, "steps": 8})
        seconds[label] = (eight.seconds - four.seconds) / 4
    built = x.log_lines(fork, "built weak model from")
    print(f"\n[pg-e2e-Forge Neo-sdxl] 64x64 s/step: plain {seconds['plain']:.2f}, PG {seconds['PG ω=0.3']:.2f} "
          f"(ratio {seconds['PG ω=0.3'] / seconds['plain']:.2f}); "
          + "; ".join(f"{k} {v:.1f} GiB" for k, v in MEASURED.items()) + f"; builds: {built}")
    assert seconds["plain"] > 0 and seconds["PG ω=0.3"] > 0
