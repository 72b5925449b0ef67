"""End-to-end SDXL: the extension inside a real Forge Neo, driven through its HTTP API (tests in
fork_sdxl_e2e.py, lean weak weights included, plus a measurement).

Runs only when NEO_PATH names a Neo install (NEO_PYTHON: its python, default $NEO_PATH/venv/bin/python);
CI has none, so the module is skipped there. One fork per pytest run; an SDXL process holds ~16–22 GiB:

    NEO_PATH=/path/to/neo/webui python -m pytest -q tests/e2e/test_neo_sdxl_e2e.py -s

Neo has no ldm: put rand-sdxl and rand-sdxl-ft (tests/e2e/make_sdxl_checkpoints.py, run with another
install's python and repositories/) in $NEO_PATH/models/Stable-diffusion beforehand, with the generator's
manifest `.rand-sdxl.json` (symlinks to a shared copy work). How Neo is started: tests/e2e/neo_fork.py.
"""

import os

import pytest

from . import fork_e2e
from . import webui_harness as h
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


V_ACTIVE, V_BASE = "rand-sdxl-vpred-ft", "rand-sdxl-vpred"
V_YAML = "model:\n  params:\n    parameterization: v\n"


@pytest.fixture(scope="module")
def v_prediction(fork):
    """The random pair as v-prediction checkpoints (NoobAI-style): links to the same files with a
    `.yaml` next to each saying `parameterization: v`, which Neo reads at load (backend/loader.py:918-941
    sets the scheduler's prediction type from it); removed after the module."""
    models = os.path.join(fork_e2e.FORK.path, "models", "Stable-diffusion")
    made = []
    try:
        for name, target in ((V_ACTIVE, x.ACTIVE), (V_BASE, x.BASE)):
            link = os.path.join(models, name + ".safetensors")
            os.symlink(os.path.realpath(os.path.join(models, target + ".safetensors")), link)
            made.append(link)
            with open(os.path.join(models, name + ".yaml"), "w") as f:
                f.write(V_YAML)
            made.append(os.path.join(models, name + ".yaml"))
        status, _ = h.request(fork.url, "POST", "/sdapi/v1/refresh-checkpoints", {})
        assert status == 200
        yield
    finally:
        for path in made:
            os.remove(path)


def on(checkpoint):
    return {"override_settings": {"sd_model_checkpoint": checkpoint}, "override_settings_restore_afterwards": True}


def test_v_prediction_sdxl(fork, disabled, v_prediction):
    """A v-prediction SDXL (Neo reads it from the checkpoint's .yaml): ω = 1 equals off bit for bit, ω = 0
    at CFG Scale 0 equals the v-prediction base's own image (the base's weights are the eps base's file)."""
    plain = x.timed("v-pred: disabled (switch)", fork_e2e.generate(fork, on(V_ACTIVE)))
    assert f"Model: {V_ACTIVE}," in plain.infotext
    assert fork_e2e.max_difference(plain.pixels, disabled.pixels) > 10, "Neo did not read the .yaml: the image is eps's"
    same = fork_e2e.generate(fork, {**on(V_ACTIVE), **x.pg(omega=1.0)})
    assert same.pixels == plain.pixels
    guided = x.timed("v-pred: ω=0 cfg 0", fork_e2e.generate(fork, {**on(V_ACTIVE), **x.OWN_CALL, **x.pg(omega=0.0)}))
    active = fork_e2e.generate(fork, {**on(V_ACTIVE), **x.OWN_CALL})
    base = x.timed("v-pred: base cfg 0 (switch)", fork_e2e.generate(fork, {**on(V_BASE), **x.OWN_CALL}))
    print(f"\n[pg-e2e-Forge Neo-sdxl] v-prediction: ω=0 vs the v-pred base at cfg 0: "
          f"{fork_e2e.max_difference(guided.pixels, base.pixels)} (active vs base: {fork_e2e.max_difference(active.pixels, base.pixels)})")
    assert fork_e2e.max_difference(active.pixels, base.pixels) > 10
    assert fork_e2e.max_difference(guided.pixels, base.pixels) <= 1
