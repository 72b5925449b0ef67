"""End-to-end: lean weak weights inside a real webui 1.10.1 (see test_webui_e2e.py for how to run).

Lean with a budget above the exact copy equals exact mode; a small budget lands
closer to exact mode than plain CFG; the factors are cached in
models/PersonalizationGuidance and reused by a restarted webui without factoring
again; the cached file loads as an ordinary LoRA on the base checkpoint and
moves images toward the fine-tune.
"""

import glob
import os
import shutil

import pytest

from . import webui_harness as h
from .test_webui_e2e import ACTIVE, BASE, REQUEST, generate, max_difference, pg

_SKIP = h.skip_reason()
if _SKIP:
    pytest.skip(_SKIP, allow_module_level=True)

LORA_NAME = "pg-lean-e2e"


def cache_folder():
    return os.path.join(h.webui_path(), "models", "PersonalizationGuidance")


def lean(omega=0.5, budget=0.0, weights="lean"):
    return pg({"enabled": True, "omega": omega, "base": BASE, "weights": weights, "lean_budget_mb": budget})


def distance(a, b):
    return sum(abs(x - y) for x, y in zip(a.pixels, b.pixels))


def start(checkpoint=ACTIVE):
    return h.WebuiServer(checkpoint=checkpoint).start()


@pytest.fixture(scope="module")
def session(request):
    h.ensure_checkpoints()
    link = h.link_extension()
    shutil.rmtree(cache_folder(), ignore_errors=True)
    servers = []
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()
        h.unlink_extension(link)
        shutil.rmtree(cache_folder(), ignore_errors=True)
        lora = os.path.join(h.lora_dir(), f"{LORA_NAME}.safetensors")
        if os.path.exists(lora):
            os.remove(lora)


def test_lean_exact_small_budget_cache_restart_and_lora(session):
    server = start()
    session.append(server)
    plain = generate(server)
    exact = generate(server, lean(weights="exact"))
    assert "PG weights: exact" in exact.infotext

    above = generate(server, lean(budget=100000))  # more than the exact copy: exact mode, bit for bit
    assert max_difference(above.pixels, exact.pixels) == 0
    assert "PG weights: exact" in above.infotext

    small = generate(server, lean())  # the default budget: 8 % of the exact copy
    assert "PG weights: \"low-rank" in small.infotext
    assert distance(small, exact) < distance(plain, exact)
    files = glob.glob(os.path.join(cache_folder(), "lean-*.safetensors"))
    assert len(files) == 1
    assert "factored in" in server.log_tail()

    server.stop()
    server = start()  # a restart: the cached factors are read, not computed again
    session.append(server)
    again = generate(server, lean())
    assert max_difference(again.pixels, small.pixels) == 0
    log = server.log_tail()
    assert "factored in" not in log and "lean weak weights" in log and "; read " in log

    # The cache file is an ordinary LoRA: on the base checkpoint it moves images toward the fine-tune.
    os.makedirs(h.lora_dir(), exist_ok=True)
    shutil.copy(files[0], os.path.join(h.lora_dir(), f"{LORA_NAME}.safetensors"))
    h.request(server.url, "POST", "/sdapi/v1/refresh-loras")
    on_base = {"override_settings": {"sd_model_checkpoint": BASE}, "override_settings_restore_afterwards": False}
    base_plain = generate(server, on_base)
    base_lora = generate(server, {**on_base, "prompt": REQUEST["prompt"] + f" <lora:{LORA_NAME}:1>"})
    active_plain = generate(server, {"override_settings": {"sd_model_checkpoint": ACTIVE}})
    assert "Lora hashes" in base_lora.infotext or LORA_NAME in base_lora.infotext
    assert distance(base_lora, active_plain) < distance(base_plain, active_plain)
    print(f"\n[pg-e2e lean] distance to exact PG: lean {distance(small, exact)}, plain CFG {distance(plain, exact)}; "
          f"to the fine-tune: base + LoRA {distance(base_lora, active_plain)}, base {distance(base_plain, active_plain)}")
