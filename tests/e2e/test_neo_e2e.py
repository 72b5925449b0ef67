"""End-to-end: the extension inside a real Forge Neo, driven through its HTTP API (tests in fork_e2e.py,
plus Neo's own refusals below).

Runs only when NEO_PATH names a Neo install (its `webui/` folder; NEO_PYTHON: its python, default
$NEO_PATH/venv/bin/python); CI has none, so the module is skipped there. One fork per pytest run:

    NEO_PATH=/path/to/neo/webui NEO_PYTHON=/path/to/venv/bin/python python -m pytest -q tests/e2e/test_neo_e2e.py -s

Neo has no ldm: the random SD 1.5 pair is generated with another install's python and repositories/
(FORK_GENERATOR_PYTHON, FORK_REPOS: reForge's or webui's), or placed in $NEO_PATH/models/Stable-diffusion
beforehand (symlinks to a shared copy work: with the generator's manifest `.rand-sd15.json` linked too, the
generator finds them up to date). How Neo is started: tests/e2e/neo_fork.py.
"""

import json

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

from .fork_e2e import *  # noqa: E402,F401,F403 (the shared tests and fixtures)
from .fork_e2e import BASE, expect_error, pg  # noqa: E402


def test_neo_is_detected_as_neo(fork):
    with open(fork.log_path, encoding="utf-8", errors="replace") as f:
        log = f.read()
    assert "'UnetPatcher' object has no attribute" not in log
    status, body, _ = fork_e2e.call(fork, pg(omega=0.3, base="no-such-model"))
    assert status >= 400 and "unknown base checkpoint" in json.dumps(body)


def test_fast_refiner_swap_is_refused_by_name(fork):
    expect_error(fork, {**pg(omega=0.3), "refiner_checkpoint": BASE, "refiner_switch_at": 0.5,
                        "override_settings": {"refiner_fast_sd": True}}, "fast refiner swap")


def test_the_xyz_plot_lists_the_pg_axes(fork):
    """Neo builds the scripts' UIs (xyz_grid's axis list) when the API starts: the [PG] axes must be
    there then (registered when webui instantiates PG's script)."""
    status, info = fork_e2e.h.request(fork.url, "GET", "/sdapi/v1/script-info")
    assert status == 200, info
    entry = next(e for e in info if e["name"] == "x/y/z plot" and not e["is_img2img"])
    x_type = next(a for a in entry["args"] if a["label"] == "X type")
    assert {"[PG] Enabled", "[PG] ω", "[PG] Base checkpoint", "[PG] Strip LoRAs"} <= set(x_type["choices"]), x_type["choices"]


def _memory_gib(pid, field):
    """VmHWM (peak) or VmRSS (now) of a process, GiB."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def test_seconds_per_step_and_memory_plain_and_with_pg(fork):
    """Run alone (-k seconds_per_step: no request before it in the process). s/step from the difference
    of a 12-step and a 4-step request, the faster of two each (text encoding, VAE and the HTTP round
    trip cancel; the minimum discounts other jobs' spikes), plain first
    (a disabled request frees PG's weak weights), then with PG's cached weak weights (ω = 0.3, the base
    checkpoint); the process's memory after each part."""
    pid, seconds, memory = fork.process.pid, {}, {}
    for label, extra in (("plain", {}), ("PG ω=0.3", pg(omega=0.3))):
        fork_e2e.generate(fork, extra)  # warm: the model loaded, the weak weights built
        four = min(fork_e2e.generate(fork, extra).seconds for _ in range(2))
        twelve = min(fork_e2e.generate(fork, {**extra, "steps": 12}).seconds for _ in range(2))
        seconds[label] = (twelve - four) / 8
        memory[label] = (_memory_gib(pid, "VmHWM"), _memory_gib(pid, "VmRSS"))
    with open(fork.log_path, encoding="utf-8", errors="replace") as f:
        built = [line.strip() for line in f if "built weak model from" in line]
    print(f"\n[pg-e2e-Forge Neo] 64x64 s/step: plain {seconds['plain']:.2f}, PG {seconds['PG ω=0.3']:.2f} "
          f"(ratio {seconds['PG ω=0.3'] / seconds['plain']:.2f}); "
          + "; ".join(f"{k}: peak RSS {m[0]:.1f} GiB, RSS {m[1]:.1f} GiB" for k, m in memory.items()) + f"; builds: {built}")
    assert seconds["plain"] > 0 and seconds["PG ω=0.3"] > 0
