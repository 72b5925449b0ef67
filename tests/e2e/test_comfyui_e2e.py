"""End to end in a real ComfyUI (headless, CPU, /prompt API) with random real-shape SD 1.5 models.

Skipped without COMFYUI_PATH (see comfyui_harness.py for COMFYUI_PYTHON, COMFYUI_SD_REPOS). Loads
two or three SD 1.5 models at once (fp32 on the CPU: 10-16 GB): run it under the machine's memory lock.
rand-sd15-ft differs from rand-sd15 in every UNet weight and in the text encoder's last layer, so the
identities at ω = 0 need the weak text encoder too.
"""

import glob
import os
import shutil

import numpy as np
import pytest

from . import comfyui_harness as h

SETTINGS, SKIP = h.settings_from_env()
pytestmark = pytest.mark.skipif(SETTINGS is None, reason=SKIP or "")

LORA_STRENGTH = 0.8


@pytest.fixture(scope="module")
def comfy():
    path, python = SETTINGS
    h.ensure_models(path, python)
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


def within(a, b, limit, what):
    difference = h.max_difference(a, b)
    print(f"{what}: max pixel difference {difference}")
    return difference <= limit


def error(comfy, workflow):
    entry, _seconds = comfy.run(workflow)
    message = h.error_message(entry)
    assert message is not None, "the run succeeded; an error was expected"
    return message


def test_the_nodes_load(comfy):
    info = comfy.get("/object_info")
    assert "PersonalizationGuidance" in info and "PersonalizationGuidanceTextEncode" in info
    node = info["PersonalizationGuidance"]
    assert node["display_name"] == "Personalization Guidance"
    assert h.BASE in node["input"]["required"]["base_checkpoint"][0]
    assert "tooltip" in node["input"]["required"]["omega"][1]


def test_omega_1_is_cfg_bit_for_bit_and_the_model_is_left_as_found(comfy):
    plain = image(comfy, h.txt2img())
    guided = image(comfy, h.txt2img(pg={"omega": 1.0, "base_checkpoint": h.BASE}, weak_negative=h.BASE))
    assert h.max_difference(plain, guided) == 0
    stronger = image(comfy, h.txt2img(pg={"omega": 0.3, "base_checkpoint": h.BASE}, weak_negative=h.BASE))
    assert h.max_difference(plain, stronger) > 0  # PG does change the image
    again = image(comfy, h.txt2img())
    assert h.max_difference(plain, again) == 0  # the model ComfyUI keeps loaded is the user's again


def test_omega_0_at_cfg_0_is_the_base_checkpoints_image(comfy):
    base = image(comfy, h.txt2img(checkpoint=h.BASE, cfg=0.0))
    from_list = image(comfy, h.txt2img(cfg=0.0, pg={"omega": 0.0, "base_checkpoint": h.BASE}, weak_negative=h.BASE))
    assert within(base, from_list, 1, "ω = 0, CFG 0, base from the list vs the base")
    as_model = image(comfy, h.txt2img(cfg=0.0, pg={"omega": 0.0}, reference=h.BASE, weak_negative=h.BASE))
    assert within(base, as_model, 1, "ω = 0, CFG 0, base as reference_model vs the base")
    without_weak_text = image(comfy, h.txt2img(cfg=0.0, pg={"omega": 0.0}, reference=h.BASE))
    assert h.max_difference(base, without_weak_text) > 1  # the fine-tune's text encoder differs: the weak negative matters


def test_a_stripped_lora_runs_at_omega_times_its_strength(comfy):
    lora = (h.LORA, LORA_STRENGTH)
    base = image(comfy, h.txt2img(checkpoint=h.BASE, cfg=0.0))
    stripped = image(comfy, h.txt2img(checkpoint=h.BASE, cfg=0.0, lora=lora, pg={"omega": 0.0}, reference="lora-free",
                                      weak_negative="lora-free"))
    assert within(base, stripped, 1, "LoRA stripped at ω = 0, CFG 0 vs the base")
    half = image(comfy, h.txt2img(checkpoint=h.BASE, cfg=0.0, lora=(h.LORA, 0.5 * LORA_STRENGTH)))
    guided_half = image(comfy, h.txt2img(checkpoint=h.BASE, cfg=0.0, lora=lora, pg={"omega": 0.5}, reference="lora-free",
                                         weak_negative="lora-free"))
    assert within(half, guided_half, 1, "LoRA at ω = 0.5 vs the LoRA at half strength, CFG 0")
    with_lora = image(comfy, h.txt2img(checkpoint=h.BASE, lora=lora))
    guided_one = image(comfy, h.txt2img(checkpoint=h.BASE, lora=lora, pg={"omega": 1.0}, reference="lora-free",
                                        weak_negative="lora-free"))
    assert h.max_difference(with_lora, guided_one) == 0


def test_a_schedule_runs(comfy):
    plain = image(comfy, h.txt2img())
    scheduled = image(comfy, h.txt2img(pg={"omega": 0.2, "schedule": "cosine", "omega_end": 0.9, "base_checkpoint": h.BASE},
                                       weak_negative=h.BASE))
    assert h.max_difference(plain, scheduled) > 0


def test_refusals_name_the_cause(comfy):
    assert "pick a base_checkpoint" in error(comfy, h.txt2img(pg={"omega": 0.5}))
    both = h.txt2img(pg={"omega": 0.5, "base_checkpoint": h.BASE}, reference=h.BASE)
    assert "not both" in error(comfy, both)
    dual = h.txt2img(pg={"omega": 0.5, "base_checkpoint": h.BASE})
    del dual["5"]
    dual.update({
        "40": {"class_type": "DualCFGGuider", "inputs": {"model": ["10", 0], "cond1": ["2", 0], "cond2": ["2", 0],
                                                        "negative": ["3", 0], "cfg_conds": 5.0, "cfg_cond2_negative": 2.0,
                                                        "style": "regular"}},
        "41": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "42": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 3, "denoise": 1.0}},
        "43": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
        "5": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["43", 0], "guider": ["40", 0], "sampler": ["41", 0],
                                                                "sigmas": ["42", 0], "latent_image": ["4", 0]}},
    })
    assert "Guider_DualCFG computes guidance its own way" in error(comfy, dual)  # DualCFGGuider's guider class
    plain = image(comfy, h.txt2img())
    assert plain.shape == (64, 64, 3)  # ComfyUI still samples after the refusals


def test_automatic_base_finds_the_base_checkpoint(comfy):
    base = image(comfy, h.txt2img(checkpoint=h.BASE, cfg=0.0))
    automatic = image(comfy, h.txt2img(cfg=0.0, pg={"omega": 0.0, "base_checkpoint": "Automatic"}, weak_negative=h.BASE))
    assert within(base, automatic, 1, "ω = 0, CFG 0, Automatic base vs the base")
    assert f"automatic base: {h.BASE}" in comfy.log_tail(200000)


def lean_cache(comfy):
    return os.path.join(comfy.path, "models", "PersonalizationGuidance")


def distance(a, b):
    return int(np.abs(a.astype(np.int32) - b.astype(np.int32)).sum())


def test_lean_weights_exact_small_budget_and_cache(comfy):
    shutil.rmtree(lean_cache(comfy), ignore_errors=True)
    try:
        def pg_image(**settings):
            return image(comfy, h.txt2img(pg={"omega": 0.5, "base_checkpoint": h.BASE, **settings}, weak_negative=h.BASE))

        plain = image(comfy, h.txt2img())
        exact = pg_image(weights="exact")
        above = pg_image(weights="lean", lean_budget_mb=100000.0)  # more than the exact copy: exact mode, bit for bit
        assert h.max_difference(above, exact) == 0
        small = pg_image(weights="lean")  # the default budget: 8 % of the exact copy
        log = comfy.log_tail(200000)
        assert "lean weak weights from" in log and "factored in" in log
        files = glob.glob(os.path.join(lean_cache(comfy), "lean-*-unet.safetensors"))
        assert len(files) == 1
        assert distance(small, exact) < distance(plain, exact)
        pg_image(weights="lean", omega=0.3)  # other weak weights (same factors: read from the cache file)
        again = pg_image(weights="lean")
        assert h.max_difference(again, small) == 0
        assert comfy.log_tail(200000).count("factored in") == 1 and "; read " in comfy.log_tail(200000)
        print(f"lean: distance to exact PG {distance(small, exact)}, plain CFG's {distance(plain, exact)}")
        print("\n".join(line for line in comfy.log_tail(200000).splitlines() if "Personalization Guidance:" in line))
    finally:
        shutil.rmtree(lean_cache(comfy), ignore_errors=True)
