"""End-to-end: the extension inside a real webui 1.10.1, driven through its HTTP API.

Runs only when SD_WEBUI_PATH names a webui 1.10.1 install (SD_WEBUI_PYTHON: its python,
default $SD_WEBUI_PATH/venv/bin/python); CI has none, so the module is skipped there.

    SD_WEBUI_PATH=/path/to/webui SD_WEBUI_PYTHON=/path/to/webui/venv/bin/python \
        python -m pytest -q tests/e2e -s

The module fixture generates tiny checkpoints into $SD_WEBUI_PATH/models/Stable-diffusion
(tests/e2e/make_tiny_checkpoints.py, run with the webui python; skipped when its manifest
matches), symlinks this repository into $SD_WEBUI_PATH/extensions, and starts webui API-only
on CPU with the fine-tuned tiny model (tiny-sd15-ft) active; tiny-sd15 is its base.
The LoRA tests write a kohya LoRA for tiny-sd15-ft (tests/e2e/make_tiny_lora.py, stdlib only) to
$SD_WEBUI_PATH/models/Lora/tinydog.safetensors (removed at the end if written here); the XYZ plot
test with the UI starts a second webui without --nowebui for its duration.
Pixels are compared exactly, decoded with a stdlib PNG reader (no PIL needed here).
"""

import json
import os
import re
import statistics
import time
from types import SimpleNamespace

import pytest

from . import webui_harness as h

_SKIP = h.skip_reason()
if _SKIP:
    pytest.skip(_SKIP, allow_module_level=True)

TITLE = "Personalization Guidance"
BASE = "tiny-sd15"
ACTIVE = "tiny-sd15-ft"
INPAINT = "tiny-sd15-inpaint"

REQUEST = {
    "prompt": "a photo of sks dog on the beach",
    "negative_prompt": "blurry",
    "steps": 4,
    "width": 64,
    "height": 64,
    "sampler_name": "Euler",
    "seed": 1234,
    "cfg_scale": 5,
    "batch_size": 1,
    "send_images": True,
    "save_images": False,
}


def pg(*args):
    return {"alwayson_scripts": {TITLE: {"args": list(args)}}}


class Result:
    def __init__(self, body, seconds):
        self.body = body
        self.seconds = seconds
        self.info = json.loads(body["info"])
        self.infotext = self.info["infotexts"][0]
        self.size, self.pixels = h.image_pixels(body["images"][0])


def max_difference(a, b):
    """The largest per-channel difference of two images' pixels (0-255)."""
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def call(server, extra=None, path="/sdapi/v1/txt2img", request=REQUEST):
    payload = {**request, **(extra or {})}
    started = time.perf_counter()
    status, body = h.request(server.url, "POST", path, payload)
    return status, body, time.perf_counter() - started


def generate(server, extra=None, path="/sdapi/v1/txt2img", request=REQUEST):
    status, body, seconds = call(server, extra, path, request)
    assert status == 200, f"{path} answered {status}: {json.dumps(body)[:3000]}\nrequest extra: {json.dumps(extra)[:2000]}"
    result = Result(body, seconds)
    assert result.size == (64, 64)
    return result


def expect_error(server, args, *fragments, request=REQUEST):
    status, body, _ = call(server, pg(*args), request=request)
    text = json.dumps(body) if not isinstance(body, str) else body
    assert status >= 400, f"expected an error for args {args!r}, got {status}: {text[:2000]}"
    for fragment in fragments:
        assert fragment in text, f"error for args {args!r} does not mention {fragment!r}: {text[:2000]}"
    return status, body


# ---- fixtures -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def webui(request):
    started = time.perf_counter()
    failures_before = request.session.testsfailed
    generated = h.ensure_checkpoints()
    link = h.link_extension()
    server = h.WebuiServer(checkpoint=ACTIVE)
    try:
        server.start()
        print(f"\n[pg-e2e] checkpoints: {'generated in %.1f s' % generated if generated else 'up to date'}; "
              f"webui API answering after {server.start_seconds:.1f} s on {server.url}; log {server.log_path}")
        yield server
    finally:
        server.stop()
        h.unlink_extension(link)
        if request.session.testsfailed == failures_before:
            server.remove_log()  # kept (and its tail shown in the report) when a test failed
        print(f"\n[pg-e2e] fixture total {time.perf_counter() - started:.1f} s (server stopped"
              f"{', extension link removed' if link else ''})")


@pytest.fixture(scope="module")
def disabled(webui):
    """The first request of the module: PG not mentioned at all."""
    return generate(webui)


@pytest.fixture(scope="module")
def pg03(webui):
    return generate(webui, pg({"enabled": True, "omega": 0.3, "base": BASE}))


# ---- tests ----------------------------------------------------------------------------------
def test_extension_loaded(webui):
    status, scripts = h.request(webui.url, "GET", "/sdapi/v1/scripts")
    assert status == 200
    assert TITLE.lower() in scripts["txt2img"] and TITLE.lower() in scripts["img2img"], scripts
    status, models = h.request(webui.url, "GET", "/sdapi/v1/sd-models")
    assert {BASE, ACTIVE, INPAINT} <= {m["model_name"] for m in models}


def test_omega_one_is_plain_cfg_and_deterministic(webui, disabled):
    assert disabled.info["sd_model_name"] == ACTIVE
    again = generate(webui)
    assert again.pixels == disabled.pixels, "the same disabled request gave different pixels"
    explicit_off = generate(webui, pg(False))
    assert explicit_off.pixels == disabled.pixels
    omega_one = generate(webui, pg(True, 1.0, BASE, "Negative prompt", "Constant", 0.5, 0.0, 1.0))
    assert omega_one.pixels == disabled.pixels, "PG with omega 1 must be plain CFG, bit for bit"
    assert "PG omega: 1" in omega_one.infotext
    omega_one_again = generate(webui, pg(True, 1.0, BASE, "Negative prompt", "Constant", 0.5, 0.0, 1.0, ""))
    assert omega_one_again.pixels == omega_one.pixels  # 9 positional args (strip_loras "") as 8


def test_omega_03_changes_the_image_and_is_recorded(webui, disabled, pg03):
    assert pg03.pixels != disabled.pixels, "PG with omega 0.3 gave the plain-CFG image"
    assert "PG omega: 0.3" in pg03.infotext, pg03.infotext
    assert "PG base: tiny-sd15" in pg03.infotext, pg03.infotext
    assert "PG base: tiny-sd15-" not in pg03.infotext, pg03.infotext  # the base, not the active model
    again = generate(webui, pg({"enabled": True, "omega": 0.3, "base": BASE}))
    assert again.pixels == pg03.pixels, "the same PG request gave different pixels"
    positional = generate(webui, pg(True, 0.3, BASE))
    assert positional.pixels == pg03.pixels, "positional and single-object forms disagree"


@pytest.mark.parametrize("args, fragments", [
    ([{"enabled": True, "omega": 1.5, "base": BASE}], ["'omega'"]),
    ([True, 1.5, BASE], ["'omega'"]),
    ([{"enabled": True, "omega": 0.3, "base": "nope"}], ["unknown base checkpoint"]),
    ([{"enabled": True, "omega": 0.3, "base": INPAINT}], ["does not match", "inpainting"]),
    ([{"omegaa": 1}], ["unknown key"]),
], ids=["omega-1.5", "omega-1.5-positional", "unknown-base", "inpaint-base", "unknown-key"])
def test_bad_input_stops_the_generation(webui, args, fragments):
    expect_error(webui, args, *fragments)


def test_settings_from_infotext(webui, pg03):
    request = {"infotext": pg03.infotext, "send_images": True, "save_images": False}
    from_text = generate(webui, request=request)
    assert "PG omega: 0.3" in from_text.infotext, from_text.infotext
    assert from_text.pixels == pg03.pixels, "the infotext did not reproduce the PG image"


def test_schedule_and_empty_weak_prompt(webui, disabled):
    result = generate(webui, pg({"enabled": True, "omega": 0.2, "omega_end": 0.9, "schedule": "cosine",
                                 "weak_prompt": "empty", "base": BASE}))
    for fragment in ("PG omega: 0.2", "PG schedule: cosine", "PG omega end: 0.9", "PG weak prompt: empty"):
        assert fragment in result.infotext, result.infotext
    assert result.pixels != disabled.pixels


def _init_image_and_mask():
    size = 64
    image = bytes(v for y in range(size) for x in range(size) for v in (4 * x, 4 * y, (2 * x + 2 * y) % 256))
    mask = bytes(255 if 16 <= x < 48 and 16 <= y < 48 else 0 for y in range(size) for x in range(size) for _ in range(3))
    return h.b64_png(size, size, image), h.b64_png(size, size, mask)


def test_img2img_inpaint_model_with_itself_as_base(webui):
    image, mask = _init_image_and_mask()
    extra = {"init_images": [image], "mask": mask, "denoising_strength": 0.75,
             "override_settings": {"sd_model_checkpoint": INPAINT}}
    # webui 1.10.1 itself: the first inpainting img2img on a freshly loaded inpainting model can
    # differ in a few pixel values (by 1) from later identical requests, with PG never used in the
    # process; so warm up first and compare against the next plain request.
    generate(webui, extra, path="/sdapi/v1/img2img")
    plain = generate(webui, extra, path="/sdapi/v1/img2img")
    assert plain.info["sd_model_name"] == INPAINT
    guided = generate(webui, {**extra, **pg({"enabled": True, "omega": 0.3, "base": INPAINT})}, path="/sdapi/v1/img2img")
    assert guided.info["sd_model_name"] == INPAINT
    assert "PG base: tiny-sd15-inpaint" in guided.infotext, guided.infotext
    # base == active: the weak model is the active model, so PG is plain CFG
    assert guided.pixels == plain.pixels
    assert generate(webui, extra, path="/sdapi/v1/img2img").pixels == plain.pixels


def test_timing_report(webui, disabled):
    off, on = [], []
    for _ in range(5):
        off.append(generate(webui).seconds)
        on.append(generate(webui, pg({"enabled": True, "omega": 0.3, "base": BASE})).seconds)
    cached = [generate(webui, pg({"enabled": True, "omega": 0.3, "base": BASE})).seconds for _ in range(5)]
    print(f"\n[pg-e2e] 64x64, 4 steps, median of 5 alternating: disabled {statistics.median(off):.3f} s, "
          f"PG omega 0.3 {statistics.median(on):.3f} s; PG back to back (weak weights cached) "
          f"{statistics.median(cached):.3f} s")


# ---- LoRA mode: the weak model is the live model without the prompt's LoRA ----------------------
LORA = "tinydog"
LORA_REQUEST = {**REQUEST, "prompt": f"a photo of sks dog <lora:{LORA}:1>"}
NO_LORA = {"prompt": "a photo of sks dog"}  # the same prompt as webui encodes it once the tag is taken out
# webui's LoRA modes: merged into the weights (default) or added in each layer's forward (the
# "lora_functional" option). webui 1.10.1 caches the prompts' conditioning under a key without
# lora_functional (processing.py cached_params), so the same prompt in the other mode would reuse
# conditioning the text encoder computed in the first one (and webui's own images then depend on the
# order of requests, PG or not). ":1.0" is the same multiplier but another cache key.
# webui 1.10.1 also restores an overridden option after the request only if it is in opts.data
# (processing.py process_images, stored_opts): lora_functional, never saved in config.json, would stay
# on for every later request. The tinydog fixture's first request puts it there (override False).
LORA_MODES = {
    "merged": ({}, LORA_REQUEST),
    "functional": ({"override_settings": {"lora_functional": True}}, {**REQUEST, "prompt": f"a photo of sks dog <lora:{LORA}:1.0>"}),
}


def lora_generate(server, mode, extra=None):
    settings, request = LORA_MODES[mode]
    return generate(server, {**settings, **(extra or {})}, request=request)


def strip(omega, strip_loras=True, **more):
    return pg({"enabled": True, "omega": omega, "strip_loras": strip_loras, **more})


@pytest.fixture(scope="module")
def tinydog(webui, disabled):
    """A real kohya LoRA for tiny-sd15-ft in $SD_WEBUI_PATH/models/Lora (removed at the end if
    written here), listed by webui; and the no-LoRA image of its prompt, from before any LoRA request."""
    path, created, layers = h.install_lora(LORA)
    try:
        status, body = h.request(webui.url, "POST", "/sdapi/v1/refresh-loras")
        assert status == 200, body
        no_lora = generate(webui, {**NO_LORA, "override_settings": {"lora_functional": False}})
        status, options = h.request(webui.url, "GET", "/sdapi/v1/options")
        assert status == 200 and options.get("lora_functional") is False, options.get("lora_functional")
        yield SimpleNamespace(path=path, layers=layers, no_lora=no_lora)
    finally:
        if created:
            os.remove(path)


@pytest.fixture(scope="module")
def lora_off(webui, tinydog):
    """PG disabled with the LoRA in the prompt, per webui LoRA mode."""
    return {mode: lora_generate(webui, mode) for mode in LORA_MODES}


def test_lora_is_listed_and_changes_the_image(webui, tinydog, lora_off):
    status, loras = h.request(webui.url, "GET", "/sdapi/v1/loras")
    assert status == 200 and LORA in {entry["name"] for entry in loras}, loras
    assert len(tinydog.layers) == 156  # 11 transformers x 12 layers + 4 CLIP layers x 6
    for mode, result in lora_off.items():
        assert f"Lora hashes: \"{LORA}: " in result.infotext, (mode, result.infotext)
        assert "Networks with errors" not in result.infotext, (mode, result.infotext)
        assert result.pixels != tinydog.no_lora.pixels, f"{mode}: the LoRA does not change the image: the LoRA tests would prove nothing"
    log = h.read_log_tail(10**7) or ""
    for fragment in ("didn't match keys", "loading network", "couldn't find"):  # the first shows with --loglevel DEBUG only
        assert fragment not in log, f"webui's log mentions {fragment!r}: the LoRA's layer names do not all map"
    print(f"\n[pg-e2e] LoRA changes the image by up to {max_difference(lora_off['merged'].pixels, tinydog.no_lora.pixels)}; "
          f"merged vs functional LoRA mode differ by up to {max_difference(lora_off['merged'].pixels, lora_off['functional'].pixels)}")


@pytest.mark.parametrize("mode", LORA_MODES)
def test_lora_strip_at_omega_one_is_plain_cfg(webui, lora_off, mode):
    result = lora_generate(webui, mode, strip(1.0))
    assert "PG strip LoRAs: *" in result.infotext, result.infotext
    assert result.pixels == lora_off[mode].pixels, f"{mode}: PG stripping the LoRA at omega 1 must be plain CFG, bit for bit"
    with_base = lora_generate(webui, mode, strip(1.0, base=BASE))
    assert "PG base: tiny-sd15" in with_base.infotext, with_base.infotext
    assert with_base.pixels == lora_off[mode].pixels, f"{mode}: base + stripped LoRA at omega 1 must be plain CFG"


@pytest.fixture(scope="module")
def lora_strip03(webui, lora_off):
    return {mode: lora_generate(webui, mode, strip(0.3)) for mode in LORA_MODES}


@pytest.mark.parametrize("mode", LORA_MODES)
def test_lora_strip_omega_03_changes_the_image(webui, lora_off, lora_strip03, mode):
    result = lora_strip03[mode]
    assert result.pixels != lora_off[mode].pixels, f"{mode}: stripping the LoRA at omega 0.3 gave the plain-CFG image"
    assert "PG omega: 0.3" in result.infotext and "PG strip LoRAs: *" in result.infotext, result.infotext
    assert "PG base:" not in result.infotext, result.infotext  # no base checkpoint: the active model without the LoRA
    again = lora_generate(webui, mode, strip(0.3))
    assert again.pixels == result.pixels, f"{mode}: the same PG request gave different pixels"
    by_name = lora_generate(webui, mode, strip(0.3, [LORA]))
    assert f"PG strip LoRAs: {LORA}" in by_name.infotext, by_name.infotext
    assert by_name.pixels == result.pixels, f"{mode}: strip_loras [{LORA!r}] and true disagree with one LoRA in the prompt"
    positional = lora_generate(webui, mode, pg(True, 0.3, "", "Negative prompt", "Constant", 0.5, 0.0, 1.0, "*"))
    assert positional.pixels == result.pixels, f"{mode}: 9 positional args and the single-object form disagree"


def test_lora_merged_and_functional_agree(lora_off, lora_strip03):
    """θ + ω·ΔLoRA (merged: offsets / low-rank corrections) and the LoRA at multiplier ω (functional)
    are the same weak model: the images differ only as much as the two LoRA modes do without PG."""
    plain = max_difference(lora_off["merged"].pixels, lora_off["functional"].pixels)
    guided = max_difference(lora_strip03["merged"].pixels, lora_strip03["functional"].pixels)
    print(f"\n[pg-e2e] merged vs functional: disabled differ by up to {plain}, PG omega 0.3 by up to {guided}")
    assert guided <= max(2, 2 * plain), (plain, guided)


def test_lora_cfg_scale_one_shows_only_the_conditional_branch(webui, lora_off):
    """cfg_scale 1: denoised = uncond + 1 * (cond - uncond) = cond, so replacing the weak
    (unconditional) branch changes nothing but float rounding; at cfg_scale 5 it shows."""
    cfg1 = {"cfg_scale": 1}
    off = generate(webui, cfg1, request=LORA_REQUEST)
    guided = generate(webui, {**cfg1, **strip(0.0)}, request=LORA_REQUEST)
    assert "PG omega: 0" in guided.infotext, guided.infotext
    low = max_difference(off.pixels, guided.pixels)
    high = max_difference(lora_off["merged"].pixels, generate(webui, strip(0.0), request=LORA_REQUEST).pixels)
    print(f"\n[pg-e2e] omega 0, LoRA stripped: max pixel difference to PG off {low} at cfg_scale 1, {high} at cfg_scale 5")
    assert low <= 2, f"at cfg_scale 1 only the conditional branch shows, yet PG changed pixels by up to {low}"
    assert high >= 20, f"at cfg_scale 5 omega 0 should change the image clearly (max difference {high})"


def test_lora_strip_errors(webui, tinydog):
    expect_error(webui, [{"enabled": True, "omega": 0.3, "strip_loras": ["nope"]}], "not active in this prompt", "nope",
                 request=LORA_REQUEST)
    expect_error(webui, [True, 0.3, "", "Negative prompt", "Constant", 0.5, 0.0, 1.0, "nope"], "not active in this prompt",
                 request=LORA_REQUEST)
    expect_error(webui, [{"enabled": True, "omega": 0.3, "strip_loras": True}], "no LoRA is active")


def test_lora_timing_report(webui, lora_off):
    off, on = [], []
    for _ in range(5):
        off.append(generate(webui, request=LORA_REQUEST).seconds)
        on.append(generate(webui, strip(0.3), request=LORA_REQUEST).seconds)
    print(f"\n[pg-e2e] LoRA prompt, 64x64, 4 steps, median of 5 alternating: disabled {statistics.median(off):.3f} s, "
          f"PG stripping the LoRA at omega 0.3 {statistics.median(on):.3f} s")


def test_lora_state_unchanged(webui, disabled, tinydog, lora_off):
    """After the LoRA requests (both modes, PG, errors): webui's model and Lora state are as before."""
    assert generate(webui).pixels == disabled.pixels, "a disabled request without the LoRA changed after the LoRA tests"
    assert generate(webui, NO_LORA).pixels == tinydog.no_lora.pixels
    for mode in LORA_MODES:
        assert lora_generate(webui, mode).pixels == lora_off[mode].pixels, f"{mode}: the LoRA's image changed"
    status, options = h.request(webui.url, "GET", "/sdapi/v1/options")
    assert status == 200 and options.get("lora_functional") is False, options.get("lora_functional")


# ---- XYZ plot through the API's script interface --------------------------------------------
XYZ_TITLE = "x/y/z plot"
# webui 1.10.1 scripts/xyz_grid.py Script.ui() return order (= Script.run's arguments), by label
XYZ_LABELS = ["X type", "X values", "X values", "Y type", "Y values", "Y values", "Z type", "Z values", "Z values",
              "Draw legend", "Include Sub Images", "Include Sub Grids", "Keep -1 for seeds", "Vary seeds for X",
              "Vary seeds for Y", "Vary seeds for Z", "Grid margins (px)", "Use text inputs instead of dropdowns"]
XYZ_OMEGAS, XYZ_CFGS = (0.2, 0.8), (3, 7)


def xyz_axis_labels(server):
    status, info = h.request(server.url, "GET", "/sdapi/v1/script-info")
    assert status == 200, info
    entry = next(e for e in info if e["name"] == XYZ_TITLE and not e["is_img2img"])
    assert [a["label"] for a in entry["args"]] == XYZ_LABELS, [a["label"] for a in entry["args"]]
    return entry["args"][0]["choices"]


def run_xyz_grid(server, baseline):
    """A 2x2 grid ([PG] ω x CFG Scale) with PG on through alwayson args; checks cells and infotexts."""
    labels = xyz_axis_labels(server)
    assert "[PG] ω" in labels, (
        "the XYZ plot has no [PG] axes on this server; its axis choices: " + ", ".join(labels))
    x_type, y_type = labels.index("[PG] ω"), labels.index("CFG Scale")
    script_args = [x_type, ", ".join(map(str, XYZ_OMEGAS)), [], y_type, ", ".join(map(str, XYZ_CFGS)), [], 0, "", [],
                   True, True, False, False, False, False, False, 0, False]
    started = time.perf_counter()
    status, body, _ = call(server, {"script_name": XYZ_TITLE, "script_args": script_args,
                                    **pg({"enabled": True, "omega": 0.5, "base": BASE})})
    seconds = time.perf_counter() - started
    assert status == 200, json.dumps(body)[:3000]
    info = json.loads(body["info"])
    assert len(body["images"]) == 5 and len(info["infotexts"]) == 5, (len(body["images"]), info["infotexts"])
    (width, height), _ = h.image_pixels(body["images"][0])
    assert width >= 128 and height >= 128, (width, height)  # the grid (2x2 cells of 64 px, plus the legend)
    cells = {}
    for index, (cfg, omega) in enumerate((c, o) for c in XYZ_CFGS for o in XYZ_OMEGAS):  # x varies fastest
        infotext = info["infotexts"][1 + index]
        assert f"PG omega: {omega}," in infotext, (omega, cfg, infotext)
        assert re.search(rf"CFG scale: {cfg}(\.0)?,", infotext), (omega, cfg, infotext)
        assert "PG base: tiny-sd15" in infotext, infotext
        size, pixels = h.image_pixels(body["images"][1 + index])
        assert size == (64, 64)
        cells[omega, cfg] = pixels
    assert len(set(cells.values())) == 4, "the grid's cells are not all different"
    direct = generate(server, {"cfg_scale": 7, **pg({"enabled": True, "omega": 0.2, "base": BASE})})
    assert direct.pixels == cells[0.2, 7], "the grid cell (omega 0.2, CFG 7) differs from the same request without the grid"
    assert generate(server).pixels == baseline.pixels, "a disabled request after the grid changed"
    print(f"\n[pg-e2e] XYZ 2x2 grid ([PG] ω at axis index {x_type}, CFG Scale at {y_type}) in {seconds:.2f} s")


@pytest.fixture
def webui_with_ui(webui, request):
    """A second webui with the gradio UI (--api, no --nowebui), the way most users run it; stopped
    after the test (its log kept, and shown, if the test failed)."""
    previous_log = h.CURRENT_LOG["path"]
    failures_before = request.session.testsfailed
    server = h.WebuiServer(checkpoint=ACTIVE, ui=True)
    try:
        server.start()
        print(f"\n[pg-e2e] webui with UI answering after {server.start_seconds:.1f} s on {server.url}")
        yield server
    finally:
        server.stop()
        if request.session.testsfailed == failures_before:
            server.remove_log()
        h.CURRENT_LOG["path"] = previous_log


def test_xyz_plot_with_ui(webui_with_ui):
    baseline = generate(webui_with_ui)
    run_xyz_grid(webui_with_ui, baseline)


def test_live_model_unchanged(webui, disabled, pg03):
    """Runs last: after PG requests, errors and a checkpoint override, plain CFG is as at the start."""
    after = generate(webui)
    assert after.info["sd_model_name"] == ACTIVE
    assert after.pixels == disabled.pixels, "a disabled request after PG requests gave different pixels"
    status, options = h.request(webui.url, "GET", "/sdapi/v1/options")
    assert status == 200
    assert options["sd_model_checkpoint"].startswith(ACTIVE + ".safetensors"), options["sd_model_checkpoint"]


def test_xyz_plot_api_only(webui, disabled):
    """The same grid on the API-only server (--nowebui). Last in the module: it runs after the final
    state check. webui builds the scripts' UIs in Api.__init__ (ui.create_ui, where xyz_grid's ui()
    fixes its axis list) before it runs the on_before_ui callbacks, so axes registered only there are
    missing in API-only mode."""
    run_xyz_grid(webui, disabled)
