"""SD 3 (MMDiT, real CFG) end to end in a real ComfyUI (headless, CPU, /prompt API), with a tiny random
SD3-style model (tests/e2e/make_tiny_sd3.py: ComfyUI's own MMDiT, depth 2, hidden 128, real SD3 text
widths) and a random subject LoRA on its joint blocks, stripped by PG (reference_model: the model before
the LoRA loader). Latents are compared (SaveLatent): the tiny model has no VAE.

Skipped without COMFYUI_PATH (see comfyui_harness.py). The text encoder is rand-sd15's CLIP-L
(fp16, 250 MB). A one-block Flux dev (zeros) checks the refusal by name; with it loaded the ComfyUI
process stays under 3 GB.
"""

import numpy as np
import pytest

from . import comfyui_harness as h

SETTINGS, SKIP = h.settings_from_env()
pytestmark = pytest.mark.skipif(SETTINGS is None, reason=SKIP or "")

STRENGTH = 0.8


@pytest.fixture(scope="module")
def comfy():
    path, python = SETTINGS
    h.ensure_tiny_sd3(path, python)
    server = h.ComfyUI(path, python).start()
    try:
        yield server
    finally:
        server.stop()


def latent(comfy, workflow):
    entry, seconds = comfy.run(workflow)
    message = h.error_message(entry)
    assert message is None, f"{message}\n{comfy.log_tail()}"
    print(f"latent in {seconds:.1f} s")
    return comfy.latent(entry, "7")


def report(a, b, what):
    difference = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
    print(f"{what}: max latent difference {difference:.3g} (latent scale {float(np.abs(a).max()):.3g})")
    return difference


def test_sd3_lora_stripping_identities(comfy):
    plain = latent(comfy, h.sd3_txt2latent(lora=STRENGTH))
    guided_one = latent(comfy, h.sd3_txt2latent(lora=STRENGTH, pg={"omega": 1.0}, weak_negative=True))
    assert report(plain, guided_one, "ω = 1 vs CFG with the LoRA") == 0.0  # bit for bit

    base = latent(comfy, h.sd3_txt2latent(cfg=0.0))
    stripped = latent(comfy, h.sd3_txt2latent(cfg=0.0, lora=STRENGTH, pg={"omega": 0.0}, weak_negative=True))
    assert report(base, stripped, "ω = 0, CFG 0 vs the model without the LoRA") <= 1e-4
    half = latent(comfy, h.sd3_txt2latent(cfg=0.0, lora=0.5 * STRENGTH))
    guided_half = latent(comfy, h.sd3_txt2latent(cfg=0.0, lora=STRENGTH, pg={"omega": 0.5}, weak_negative=True))
    assert report(half, guided_half, "ω = 0.5, CFG 0 vs the LoRA at half strength") <= 1e-4

    guided = latent(comfy, h.sd3_txt2latent(lora=STRENGTH, pg={"omega": 0.3}, weak_negative=True))
    assert report(plain, guided, "ω = 0.3 vs CFG") > 1e-3  # PG changes the result
    again = latent(comfy, h.sd3_txt2latent(lora=STRENGTH))
    assert report(plain, again, "plain CFG again") == 0.0  # the model ComfyUI keeps loaded is the user's
    log = comfy.log_tail(200000)
    assert "UNet layers differ" in log and "steps guided" in log


def test_flux_dev_is_refused_by_name_before_sampling(comfy):
    """A Flux dev diffusion model (one double block, zeros: make_tiny_sd3.py --flux) through the PG node: the
    run stops on the PG node with the family's name, and the sampler never runs."""
    workflow = h.sd3_txt2latent(pg={"omega": 0.5}, weak_negative=True)
    workflow["1"]["inputs"]["unet_name"] = h.FLUX_UNET
    entry, _seconds = comfy.run(workflow)
    message = h.error_message(entry)
    print(message)
    assert message is not None and message.startswith("PersonalizationGuidance:")
    assert "Flux (dev/schnell) is guidance-distilled" in message
    assert "7" not in entry.get("outputs", {})
    with open(f"/proc/{comfy.process.pid}/status") as status:
        print(" ".join(line.strip() for line in status if line.startswith(("VmHWM", "VmRSS"))), "(the ComfyUI process)")
