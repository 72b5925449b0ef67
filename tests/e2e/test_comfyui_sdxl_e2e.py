"""SDXL end to end in a real ComfyUI (see test_comfyui_e2e.py), with a random real-shape SDXL pair.

Runs when COMFYUI_SDXL names two checkpoint files in $COMFYUI_PATH/models/checkpoints, the base and its
"fine-tune", as `BASE,ACTIVE` (e.g. the pair tests/e2e/make_sdxl_checkpoints.py writes for the forks:
rand-sdxl.safetensors,rand-sdxl-ft.safetensors). Two SDXL models in fp32 do not fit a 24 GiB machine
next to each other: run ComfyUI with COMFYUI_ARGS=--bf16-unet there.
"""

import os

import pytest

from . import comfyui_harness as h

SETTINGS, SKIP = h.settings_from_env()
PAIR = os.environ.get("COMFYUI_SDXL", "")
pytestmark = pytest.mark.skipif(SETTINGS is None or "," not in PAIR,
                                reason=SKIP or "set COMFYUI_SDXL=BASE,ACTIVE (two SDXL files in models/checkpoints)")
BASE, ACTIVE = (PAIR.split(",") + [""])[:2]
NEGATIVE = "blurry, low quality"  # not empty: SDXL zeroes an empty negative on some hosts; ComfyUI encodes it


@pytest.fixture(scope="module")
def comfy():
    path, python = SETTINGS
    server = h.ComfyUI(path, python).start()
    try:
        yield server
    finally:
        server.stop()


def image(comfy, workflow):
    entry, seconds = comfy.run(workflow)
    message = h.error_message(entry)
    assert message is None, f"{message}\n{comfy.log_tail()}"
    print(f"image in {seconds:.1f} s")
    return comfy.image(entry, "7")


def test_sdxl_identities(comfy):
    common = dict(negative=NEGATIVE, size=64, steps=3)
    plain = image(comfy, h.txt2img(checkpoint=ACTIVE, **common))
    guided = image(comfy, h.txt2img(checkpoint=ACTIVE, pg={"omega": 1.0}, reference=BASE, weak_negative=BASE, **common))
    assert h.max_difference(plain, guided) == 0
    base = image(comfy, h.txt2img(checkpoint=BASE, cfg=0.0, **common))
    weak = image(comfy, h.txt2img(checkpoint=ACTIVE, cfg=0.0, pg={"omega": 0.0}, reference=BASE, weak_negative=BASE, **common))
    difference = h.max_difference(base, weak)
    print(f"SDXL ω = 0 at CFG 0 against the base: max pixel difference {difference}")
    with open(f"/proc/{comfy.process.pid}/status") as status:
        print(" ".join(line.strip() for line in status if line.startswith(("VmHWM", "VmRSS"))), "(the ComfyUI process)")
    print("\n".join(line for line in comfy.log_tail(200000).splitlines()
                    if "Personalization Guidance:" in line or "model weight dtype" in line))
    assert difference <= 1
