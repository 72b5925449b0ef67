"""End-to-end: PG next to real third-party webui extensions, in one real webui 1.10.1.

Runs only when SD_WEBUI_PATH names a webui 1.10.1 install (as test_webui_e2e.py) AND
SD_WEBUI_EXTENSIONS names a folder of extension checkouts, one subfolder each, named as their
repositories (a test whose extension is missing is skipped):

    sd-webui-controlnet, multidiffusion-upscaler-for-automatic1111, adetailer, sd-webui-incantations,
    sd-dynamic-thresholding, sd-webui-regional-prompter, sd-webui-lora-block-weight

    SD_WEBUI_PATH=... SD_WEBUI_PYTHON=... SD_WEBUI_EXTENSIONS=/path/to/ext \
        python -m pytest -q tests/e2e/test_interop_e2e.py -s

Their Python dependencies must be in webui's venv (webui runs with --skip-install, so no
install.py runs): ControlNet needs controlnet_aux, addict, yapf; ADetailer ultralytics, rich and
mediapipe 0.10.13-0.10.15 (1.x has no mediapipe.solutions, which controlnet_aux imports too). The module fixture links every checkout, this repository and a test-only helper
extension (written to a temp folder: it points ControlNet's hard-coded SD1 config at the tiny UNet
and gives ADetailer's face detector a fixed box, since noise images from tiny models hold no face)
into $SD_WEBUI_PATH/extensions, writes a tiny ControlNet (make_tiny_controlnet.py) and the tiny
LoRA, starts one webui, and removes all of it afterwards.

The bar for every extension, with it active:
  1. PG at omega 1 gives the pixels of PG off, bit for bit;
  2. the weak branch is the reference model's: at cfg_scale 0 webui's combine_denoised returns the
     unconditional prediction exactly, so PG at omega 0 with base tiny-sd15 on the active
     tiny-sd15-ft must give the pixels of tiny-sd15 itself with PG off (same extension settings),
     up to WEAK_TOLERANCE. Both requests run with batch_cond_uncond off: webui then evaluates the
     unconditional rows in a call of their own, as PG's routed layers do, so no row-batching
     rounding enters the comparison. The tolerance: without any extension, PG at omega 0 already
     differs from the reference model by up to 1 (of 255) in some pixels after a few steps (1 to 3,
     depending on torch's thread count and PG's version), in both directions (active ft / base
     sd15 and active sd15 / base ft), for some seeds and not others
     (test_weak_branch_without_extensions measures it): last-bit float differences of the weak
     evaluation, not a routing error (weak weights left at the safetensors file's unaligned offsets
     were one source, fixed in lib_pg/weights.aligned; a difference of 1 after 3 steps remains in
     real webui and is not understood yet). The routing bugs these tests were written for showed
     as differences of 11 (ControlNet) and 52-76 (Tiled Diffusion);
  3. no "PG skipped" in the infotext when nothing was skipped, and the live model unchanged
     afterwards (a plain request gives the module's first image again).
"""

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from types import SimpleNamespace

import pytest

from . import webui_harness as h

_SKIP = h.interop_skip_reason()
if _SKIP:
    pytest.skip(_SKIP, allow_module_level=True)

TITLE = "Personalization Guidance"
BASE = "tiny-sd15"
ACTIVE = "tiny-sd15-ft"
LORA = "tinydog"

CONTROLNET = "sd-webui-controlnet"
TILED = "multidiffusion-upscaler-for-automatic1111"
ADETAILER = "adetailer"
INCANTATIONS = "sd-webui-incantations"
DYNTHRES = "sd-dynamic-thresholding"
REGIONAL = "sd-webui-regional-prompter"
LBW = "sd-webui-lora-block-weight"

HELPER_NAME = "pg-e2e-interop-helper"
TINY_CONTROLNET = "pg-e2e-tiny-controlnet"
# controlnet_default_config values for the tiny UNet (see make_tiny_controlnet.py for why 4 levels)
CONTROLNET_CONFIG = {
    "adm_in_channels": None, "in_channels": 4, "model_channels": 32, "num_res_blocks": 2,
    "attention_resolutions": [1, 2, 4], "transformer_depth": [1, 1, 1, 0], "channel_mult": [1, 1, 2, 2],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 32, "num_heads": 2,
    "global_average_pooling": False,
}
# ADetailer's (patched) detector finds this box [x1, y1, x2, y2] on every image
AD_BOX = [20, 20, 44, 44]

REQUEST = {
    "prompt": "a photo of sks dog on the beach",
    "negative_prompt": "blurry",
    "steps": 3,
    "width": 64,
    "height": 64,
    "sampler_name": "Euler",
    "seed": 1234,
    "cfg_scale": 5,
    "batch_size": 1,
    "send_images": True,
    "save_images": False,
}
# cfg_scale 0: denoised = the unconditional (weak) prediction; batch_cond_uncond off: see the docstring
WEAK_ONLY = {"cfg_scale": 0}
WEAK_TOLERANCE = 1  # max pixel difference (0-255) for bar 2, see the module docstring
NO_ROW_BATCH = {"batch_cond_uncond": False}
# override_settings the tests use: put into opts.data once, so webui restores them after each request
# (modules/processing.py process_images restores only keys already in opts.data)
SETTLED_OPTIONS = ("batch_cond_uncond", "lora_functional", "ad_script_names", "sd_model_checkpoint")

HELPER_SCRIPT = r'''
"""Test-only helper written by tests/e2e/test_interop_e2e.py (not part of any extension)."""
import json
import os
import sys

from modules import script_callbacks, scripts

CONTROLNET_CONFIG = json.loads(%(config)r)
AD_BOX = json.loads(%(box)r)


def _point_controlnet_at_the_tiny_unet():
    for module in list(sys.modules.values()):
        config = getattr(module, "controlnet_default_config", None)
        if isinstance(config, dict) and hasattr(module, "build_model_by_guess"):
            config.update(CONTROLNET_CONFIG)
            print(f"[pg-e2e helper] ControlNet SD1 config -> {CONTROLNET_CONFIG}", flush=True)


def _fixed_box_for_adetailer():
    for data in scripts.scripts_data:
        if os.path.basename(data.path) == "!adetailer.py" and hasattr(data.module, "mediapipe_predict"):
            module = data.module

            def mediapipe_predict(model_type, image, confidence=0.3):
                common = sys.modules["adetailer.common"]
                print(f"[pg-e2e helper] ADetailer detector ({model_type}): fixed box {AD_BOX}", flush=True)
                return common.PredictOutput(bboxes=[list(map(float, AD_BOX))],
                                            masks=common.create_mask_from_bbox([AD_BOX], image.size),
                                            confidences=[0.99], preview=image.copy())

            module.mediapipe_predict = mediapipe_predict
            print("[pg-e2e helper] ADetailer mediapipe detector -> fixed box", flush=True)


def _on_app_started(*_args):
    _point_controlnet_at_the_tiny_unet()
    _fixed_box_for_adetailer()


script_callbacks.on_app_started(_on_app_started)
'''


# ---- requests -------------------------------------------------------------------------------
class Result:
    def __init__(self, body, seconds):
        self.body = body
        self.seconds = seconds
        self.info = json.loads(body["info"])
        self.infotext = self.info["infotexts"][0]
        self.size, self.pixels = h.image_pixels(body["images"][0])

    def params(self):
        return infotext_params(self.infotext)


def infotext_params(infotext):
    """{key: value} of an infotext's last line (webui's "k: v, k: "quoted, value", ..." form)."""
    last = infotext.strip().split("\n")[-1]
    return {m.group(1).strip(): m.group(2).strip().strip('"')
            for m in re.finditer(r'\s*([\w \-/().]+):\s*("(?:\\.|[^"])*"|[^,]*)(?:,|$)', last)}


def pg_notes(result):
    """The infotext's PG entries."""
    return {k: v for k, v in result.params().items() if k.startswith("PG ")}


def max_difference(a, b):
    assert len(a) == len(b)
    return max((abs(x - y) for x, y in zip(a, b)), default=0)


def merge(*parts):
    """Request fragments merged; alwayson_scripts and override_settings are merged key by key."""
    out = {}
    for part in parts:
        for key, value in (part or {}).items():
            if key in ("alwayson_scripts", "override_settings"):
                out[key] = {**out.get(key, {}), **value}
            else:
                out[key] = value
    return out


def generate(server, *parts, path="/sdapi/v1/txt2img", request=REQUEST):
    payload = merge(request, *parts)
    started = time.perf_counter()
    status, body = h.request(server.url, "POST", path, payload)
    seconds = time.perf_counter() - started
    assert status == 200, f"{path} answered {status}: {json.dumps(body)[:3000]}\nrequest: {json.dumps(payload)[:3000]}"
    result = Result(body, seconds)
    assert result.size == (payload["width"], payload["height"])
    return result


def pg(**settings):
    return {"alwayson_scripts": {TITLE: {"args": [{"enabled": True, **settings}]}}}


def script(title, args):
    return {"alwayson_scripts": {title: {"args": args}}}


def settings(**values):
    return {"override_settings": values}


def reference_model():
    return settings(sd_model_checkpoint=BASE)


# ---- the bar ----------------------------------------------------------------------------------
def assert_no_skip_note(result, what):
    assert "PG skipped" not in result.infotext, f"{what}: PG reports skipped work: {pg_notes(result)}"


def check_omega_one(server, ext, what, request=REQUEST, **pg_settings):
    """Bar 1: PG at omega 1 == PG off, bit for bit, with the extension active. Returns PG off's result."""
    off = generate(server, ext, request=request)
    one = generate(server, ext, pg(omega=1.0, base=BASE, **pg_settings), request=request)
    assert "PG omega: 1" in one.infotext, one.infotext
    assert one.pixels == off.pixels, (f"{what}: PG at omega 1 must be plain CFG bit for bit, max difference "
                                      f"{max_difference(one.pixels, off.pixels)}")
    assert_no_skip_note(one, what)
    return off


def check_weak_branch(server, ext, what, request=REQUEST, reference_request=None, **pg_settings):
    """Bar 2: at cfg_scale 0 the image is the weak branch's; PG at omega 0 (base tiny-sd15, active
    tiny-sd15-ft) must equal tiny-sd15 itself with PG off. Returns (guided, reference)."""
    guided = generate(server, ext, WEAK_ONLY, settings(**NO_ROW_BATCH), pg(omega=0.0, base=BASE, **pg_settings),
                      request=request)
    reference = generate(server, ext, WEAK_ONLY, settings(**NO_ROW_BATCH), reference_model(),
                         request=reference_request or request)
    assert reference.info["sd_model_name"] == BASE and guided.info["sd_model_name"] == ACTIVE
    difference = max_difference(guided.pixels, reference.pixels)
    print(f"\n[pg-e2e] {what}: weak branch vs reference model: max pixel difference {difference}")
    assert difference <= WEAK_TOLERANCE, (
        f"{what}: the weak branch (PG omega 0, cfg_scale 0) differs from the reference model's by up to "
        f"{difference} (PG notes: {pg_notes(guided)})")
    assert_no_skip_note(guided, what)
    return guided, reference


def check_guided(server, ext, off, what, request=REQUEST, **pg_settings):
    """PG at omega 0.3 changes the image, without a skip note. Returns its result."""
    guided = generate(server, ext, pg(omega=0.3, base=BASE, **pg_settings), request=request)
    assert guided.pixels != off.pixels, f"{what}: PG at omega 0.3 gave PG off's image"
    assert_no_skip_note(guided, what)
    return guided


def check_left_nothing(interop, what):
    """Bar 3: a plain request after the extension's requests gives the module's first image."""
    after = generate(interop.server)
    assert after.info["sd_model_name"] == ACTIVE
    assert after.pixels == interop.baseline.pixels, f"{what}: a plain request afterwards gives other pixels"


def need(interop, name):
    if name not in interop.extensions:
        pytest.skip(f"{name} is not in SD_WEBUI_EXTENSIONS={h.extensions_source()}")


# ---- fixtures -------------------------------------------------------------------------------
def write_helper_extension(root):
    os.makedirs(os.path.join(root, "scripts"))
    with open(os.path.join(root, "scripts", "pg_e2e_interop_helper.py"), "w", encoding="utf-8") as f:
        f.write(HELPER_SCRIPT % {"config": json.dumps(CONTROLNET_CONFIG), "box": json.dumps(AD_BOX)})


def write_tiny_controlnet(controlnet_dir):
    """models/ControlNet/<TINY_CONTROLNET>.safetensors (ControlNet's own model folder). Returns its path."""
    directory = os.path.join(h.webui_path(), "models", "ControlNet")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, TINY_CONTROLNET + ".safetensors")  # the tests' own name: a leftover is replaced
    result = subprocess.run(
        [h.webui_python(), os.path.join(h.HERE, "make_tiny_controlnet.py"), path, "--controlnet", controlnet_dir,
         "--repos", os.path.join(h.webui_path(), "repositories"), "--config", json.dumps(CONTROLNET_CONFIG)],
        cwd=h.HERE, env={**os.environ, **h.OFFLINE_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=600)
    if result.returncode != 0 or not os.path.exists(path):
        raise RuntimeError(f"make_tiny_controlnet.py failed (rc {result.returncode}):\n{result.stdout[-6000:]}")
    return path


def describe_extensions(extensions):
    return ", ".join(f"{name} ({h.extension_revision(path) or 'no git'})" for name, path in extensions.items())


@pytest.fixture(scope="module")
def interop(request):
    started = time.perf_counter()
    failures_before = request.session.testsfailed
    generated = h.ensure_checkpoints()
    extensions = h.available_extensions()
    links, files, helper_root, server = [], [], None, None
    try:
        helper_root = tempfile.mkdtemp(prefix="pg-e2e-interop-")
        write_helper_extension(os.path.join(helper_root, HELPER_NAME))
        if CONTROLNET in extensions:
            files.append(write_tiny_controlnet(extensions[CONTROLNET]))
        lora_path, lora_created, _layers = h.install_lora(LORA)
        if lora_created:
            files.append(lora_path)
        links.append(h.link_extension())
        links.append(h.link_into_extensions(os.path.join(helper_root, HELPER_NAME), HELPER_NAME))
        for name, path in extensions.items():
            links.append(h.link_into_extensions(path, name))
        server = h.WebuiServer(checkpoint=ACTIVE)
        server.start()
        print(f"\n[pg-e2e] interop: checkpoints {'generated in %.1f s' % generated if generated else 'up to date'}; "
              f"extensions {describe_extensions(extensions)}; "
              f"webui API answering after {server.start_seconds:.1f} s on {server.url}; log {server.log_path}")
        status, options = h.request(server.url, "GET", "/sdapi/v1/options")
        assert status == 200, options
        settle = {key: options[key] for key in SETTLED_OPTIONS if key in options}
        baseline = generate(server, settings(**settle))
        assert baseline.info["sd_model_name"] == ACTIVE
        assert generate(server).pixels == baseline.pixels
        yield SimpleNamespace(server=server, extensions=extensions, baseline=baseline, options=options)
    finally:
        if server is not None:
            server.stop()
        for link in links:
            h.unlink_extension(link)
        for path in files:
            if os.path.exists(path):
                os.remove(path)
        if helper_root:
            shutil.rmtree(helper_root, ignore_errors=True)
        if server is not None and request.session.testsfailed == failures_before:
            server.remove_log()
        print(f"\n[pg-e2e] interop fixture total {time.perf_counter() - started:.1f} s (server stopped, "
              f"{sum(1 for link in links if link)} extension links and {len(files)} generated files removed)")


def test_extensions_loaded(interop):
    status, scripts = h.request(interop.server.url, "GET", "/sdapi/v1/scripts")
    assert status == 200
    titles = {CONTROLNET: "controlnet", TILED: "tiled diffusion", ADETAILER: "adetailer", INCANTATIONS: "incantations",
              DYNTHRES: "dynamic thresholding (cfg scale fix)", REGIONAL: "regional prompter", LBW: "lora block weight"}
    for name in interop.extensions:
        if name in titles:
            assert titles[name] in scripts["txt2img"], (name, scripts["txt2img"])
    assert TITLE.lower() in scripts["txt2img"]
    log = interop.server.log_text()
    assert "*** Error loading script" not in log, "an extension's script failed to load: see the webui log"
    if CONTROLNET in interop.extensions:
        assert "[pg-e2e helper] ControlNet SD1 config" in log
    if ADETAILER in interop.extensions:
        assert "[pg-e2e helper] ADetailer mediapipe detector -> fixed box" in log


def test_weak_branch_without_extensions(interop):
    """Bar 2 with no extension active: the calibration of WEAK_TOLERANCE (see the module docstring)."""
    for steps in (1, 3):
        check_weak_branch(interop.server, {}, f"no extension, {steps} steps", request={**REQUEST, "steps": steps})


# ---- ControlNet -----------------------------------------------------------------------------
def control_image():
    size = 64
    rgb = bytes(v for y in range(size) for x in range(size)
                for v in ((255 if (x // 8 + y // 8) % 2 else 0), 4 * x, 4 * y))
    return h.b64_png(size, size, rgb)


def controlnet(mode):
    return script("ControlNet", [{
        "enabled": True, "module": "none", "model": TINY_CONTROLNET, "weight": 1.0, "image": control_image(),
        "resize_mode": "Crop and Resize", "control_mode": mode, "pixel_perfect": False, "processor_res": 64,
        "guidance_start": 0.0, "guidance_end": 1.0}])


@pytest.mark.parametrize("mode, weak_prompt", [
    ("ControlNet is more important", "negative"),
    ("ControlNet is more important", "empty"),
    ("Balanced", "negative"),
], ids=["more-important", "more-important-empty-weak-prompt", "balanced"])
def test_controlnet(interop, mode, weak_prompt):
    """ControlNet 1.1.455 tells conditional from unconditional rows by a marker row in each
    conditioning tensor (scripts/hook.py mark_prompt_context); in "ControlNet is more important"
    the control goes to the conditional rows only, so the weak rows must carry the unconditional
    marker too, also when PG computes their conditioning itself (the fine-tuned text encoder
    differs from the base's; weak prompt "empty")."""
    need(interop, CONTROLNET)
    server, ext, what = interop.server, controlnet(mode), f"ControlNet {mode}, weak prompt {weak_prompt}"
    off = check_omega_one(server, ext, what, weak_prompt=weak_prompt)
    assert "ControlNet 0" in off.infotext, off.infotext
    assert off.pixels != interop.baseline.pixels, "the tiny ControlNet does not change the image: the test proves nothing"
    reference_request = {**REQUEST, "negative_prompt": ""} if weak_prompt == "empty" else None
    check_weak_branch(server, ext, what, weak_prompt=weak_prompt, reference_request=reference_request)
    check_guided(server, ext, off, what, weak_prompt=weak_prompt)
    check_left_nothing(interop, what)


# ---- Tiled Diffusion / Tiled VAE ---------------------------------------------------------------
TILED_REQUEST = {**REQUEST, "width": 128, "height": 128}


def tiled_diffusion(server, method, tile_batch):
    """128x128 px = 16x16 latent, tiles of 8x8 with overlap 4: a 3x3 grid of 9 tiles."""
    defaults = h.alwayson_defaults(server, "Tiled Diffusion")
    args = h.alwayson_args(defaults, {0: ("Enable Tiled Diffusion", True), 1: ("Method", method),
                                      6: ("Latent tile width", 8), 7: ("Latent tile height", 8),
                                      8: ("Latent tile overlap", 4), 9: ("Latent tile batch size", tile_batch)})
    return script("Tiled Diffusion", args)


@pytest.mark.parametrize("method", ["MultiDiffusion", "Mixture of Diffusers"])
@pytest.mark.parametrize("tile_batch", [1, 4])
def test_tiled_diffusion(interop, method, tile_batch):
    """Tiled Diffusion evaluates a step as UNet calls per tile (batch) over [tile: cond..., uncond...]
    rows (tile_methods/*.py): every tile's unconditional rows are PG's."""
    need(interop, TILED)
    server, what = interop.server, f"Tiled Diffusion {method}, tile batch {tile_batch}"
    ext = tiled_diffusion(server, method, tile_batch)
    off = check_omega_one(server, ext, what, request=TILED_REQUEST)
    assert "Tiled Diffusion" in off.infotext, off.infotext
    untiled = generate(server, request=TILED_REQUEST)
    assert untiled.pixels != off.pixels, "Tiled Diffusion did not change the image: it did not tile"
    check_weak_branch(server, ext, what, request=TILED_REQUEST)
    check_guided(server, ext, off, what, request=TILED_REQUEST)
    check_left_nothing(interop, what)


TILED_VAE_REQUEST = {**REQUEST, "width": 256, "height": 256}


def test_tiled_vae(interop):
    """Tiled VAE decodes in tiles only when the latent is larger than tile + 2 x 11 (its decoder
    padding, scripts/tilevae.py VAEHook): 256 px = 32 latent with tiles of 8 gives 2 x 2 tiles."""
    need(interop, TILED)
    server, what = interop.server, "Tiled VAE"
    defaults = h.alwayson_defaults(server, "Tiled VAE")
    ext = script("Tiled VAE", h.alwayson_args(defaults, {0: ("Enable Tiled VAE", True), 2: ("Decoder Tile Size", 8)}))
    mark = server.log_size()
    off = check_omega_one(server, ext, what, request=TILED_VAE_REQUEST)
    assert "[Tiled VAE]: split to" in server.log_since(mark), "Tiled VAE did not tile"
    assert generate(server, request=TILED_VAE_REQUEST).pixels != off.pixels, "Tiled VAE did not change the decoding"
    check_weak_branch(server, ext, what, request=TILED_VAE_REQUEST)
    check_guided(server, ext, off, what, request=TILED_VAE_REQUEST)
    check_left_nothing(interop, what)


# ---- Incantations (PAG) ------------------------------------------------------------------------
def incantations_pag(server, scale):
    defaults = h.alwayson_defaults(server, "Incantations")
    return script("Incantations", h.alwayson_args(defaults, {12: ("Active", True), 13: ("PAG Scale", scale)}))


def test_incantations_pag(interop):
    """PAG adds one all-conditional UNet call per step (scripts/pag.py on_cfg_denoised): it is the
    personalized model's; PG leaves it alone and must not report it as skipped work. Bar 2 does not
    apply: PAG's term uses the conditional rows at any cfg_scale, so the weak branch cannot be
    isolated; instead PG with PAG must differ from PG without it (PAG acts) and from PAG without PG,
    and at cfg_scale 1 (the weak branch cancels) PG must leave PAG's image as it is, up to rounding."""
    need(interop, INCANTATIONS)
    server, what = interop.server, "Incantations PAG"
    ext = incantations_pag(server, 3.0)
    off = check_omega_one(server, ext, what)
    assert "PAG Active" in off.infotext, off.infotext
    assert off.pixels != interop.baseline.pixels, "PAG did not change the image"
    guided = check_guided(server, ext, off, what)
    assert not any("extra UNet calls" in value for value in pg_notes(guided).values()), pg_notes(guided)
    without_pag = generate(server, pg(omega=0.3, base=BASE))
    assert guided.pixels != without_pag.pixels, "PAG did not act with PG on"
    # cfg_scale 1: webui's result is the conditional prediction (plus PAG's term, from PAG's own call):
    # the weak branch cancels up to rounding, so PG at omega 0 must leave PAG's image (nearly) as it
    # is; a PAG call routed to the weak weights would change it clearly
    cfg1 = {"cfg_scale": 1}
    difference = max_difference(generate(server, ext, cfg1, pg(omega=0.0, base=BASE)).pixels,
                                generate(server, ext, cfg1).pixels)
    print(f"\n[pg-e2e] {what}: cfg_scale 1, PG omega 0 vs PG off: max pixel difference {difference}")
    assert difference <= 2, f"{what}: at cfg_scale 1 PG changed PAG's image by up to {difference}"
    check_left_nothing(interop, what)


# ---- ADetailer ---------------------------------------------------------------------------------
def adetailer(**unit):
    return script("ADetailer", [True, False, {"ad_model": "mediapipe_face_full", "ad_denoising_strength": 0.5,
                                              **unit}])


def with_pg_in_adetailer(interop):
    """ADetailer's passes run only the always-on scripts named in its setting ad_script_names
    (scripts/!adetailer.py script_filter matches the scripts' file names)."""
    names = interop.options.get("ad_script_names", "")
    return settings(ad_script_names=",".join([n for n in names.split(",") if n] + ["personalization_guidance"]))


def pixels_outside(result, box, margin):
    (width, height), rgb = result.size, result.pixels
    x1, y1, x2, y2 = box[0] - margin, box[1] - margin, box[2] + margin, box[3] + margin
    return bytes(rgb[(y * width + x) * 3 + c] for y in range(height) for x in range(width)
                 if not (x1 <= x < x2 and y1 <= y < y2) for c in range(3))


def pixels_inside(result, box):
    (width, _height), rgb = result.size, result.pixels
    return bytes(rgb[(y * width + x) * 3 + c] for y in range(box[1], box[3]) for x in range(box[0], box[2])
                 for c in range(3))


def test_adetailer(interop):
    """With personalization_guidance in ADetailer's ad_script_names, PG acts in ADetailer's
    inpainting pass on the weak model it built for the image (reused, not rebuilt); without it,
    ADetailer's pass runs without PG, and PG's infotext says so."""
    need(interop, ADETAILER)
    server, ext, what = interop.server, adetailer(), "ADetailer"
    in_pass = with_pg_in_adetailer(interop)
    plain = generate(server)
    off = generate(server, ext, in_pass)
    assert "ADetailer model: mediapipe_face_full" in off.infotext, off.infotext
    assert off.pixels != plain.pixels, "ADetailer's pass did not change the image"
    assert pixels_outside(off, AD_BOX, 16) == pixels_outside(plain, AD_BOX, 16), "ADetailer changed pixels far from its box"

    # 1: omega 1 in both passes is PG off
    one = generate(server, ext, in_pass, pg(omega=1.0, base=BASE))
    assert one.pixels == off.pixels, f"{what}: PG at omega 1 must be plain CFG in ADetailer's pass too"
    assert_no_skip_note(one, what)

    # PG in ADetailer's pass: one weak-model build for the whole generation (main pass + ADetailer's)
    generate(server, pg(omega=0.31, base=BASE))  # another omega: the next request must build its weak model
    mark = server.log_size()
    both = generate(server, ext, in_pass, pg(omega=0.3, base=BASE))
    log = server.log_since(mark)
    assert log.count("[pg-e2e helper] ADetailer detector") == 1, log[-3000:]
    builds = log.count("built weak model")
    assert builds == 1, f"PG built its weak model {builds} times in one generation with ADetailer's pass:\n{log[-3000:]}"
    assert_no_skip_note(both, what)

    # without the setting: ADetailer's pass runs without PG (same main pass): the images differ
    # inside ADetailer's box only
    main_only = generate(server, ext, pg(omega=0.3, base=BASE))
    assert pixels_outside(both, AD_BOX, 16) == pixels_outside(main_only, AD_BOX, 16), (
        "PG in ADetailer's pass changed pixels outside ADetailer's box")
    assert pixels_inside(both, AD_BOX) != pixels_inside(main_only, AD_BOX), "PG did not act in ADetailer's pass"
    assert both.pixels != generate(server, ext, in_pass).pixels
    check_left_nothing(interop, what)
    # ... and PG's infotext says that ADetailer's pass ran without it
    notes = pg_notes(main_only)
    assert any("ADetailer" in value for value in notes.values()), (
        f"PG does not say that ADetailer's pass ran without it: PG entries {notes}; infotext {main_only.infotext!r}")


# ---- Dynamic Thresholding -----------------------------------------------------------------------
def dynamic_thresholding(server, mimic):
    defaults = h.alwayson_defaults(server, "Dynamic Thresholding (CFG Scale Fix)")
    return script("Dynamic Thresholding (CFG Scale Fix)", h.alwayson_args(
        defaults, {0: ("Enable Dynamic Thresholding (CFG Scale Fix)", True), 1: ("Mimic CFG Scale", mimic)}))


def test_dynamic_thresholding(interop):
    """Dynamic Thresholding replaces the CFG denoiser's combine_denoised; at cfg_scale 0 and mimic
    scale 0 its result is a function of the unconditional prediction alone, so bar 2 holds."""
    need(interop, DYNTHRES)
    server, what = interop.server, "Dynamic Thresholding"
    ext = dynamic_thresholding(server, 3.0)
    off = check_omega_one(server, ext, what)
    assert off.pixels != interop.baseline.pixels, "Dynamic Thresholding did not change the image"
    check_weak_branch(server, dynamic_thresholding(server, 0.0), what)
    check_guided(server, ext, off, what)
    check_left_nothing(interop, what)


# ---- Regional Prompter --------------------------------------------------------------------------
REGIONAL_REQUEST = {**REQUEST, "prompt": "a photo of sks dog BREAK on the beach"}


def regional_prompter(server, mode):
    defaults = h.alwayson_defaults(server, "Regional Prompter")
    return script("Regional Prompter", h.alwayson_args(defaults, {
        0: ("Regional Prompter", True), 2: "Matrix", 3: ("Main Splitting", "Columns"), 6: ("Divide Ratio", "1,1"),
        11: ("Generation Mode", mode)}))


@pytest.mark.parametrize("mode", ["Attention", "Latent"])
def test_regional_prompter(interop, mode):
    need(interop, REGIONAL)
    server, what = interop.server, f"Regional Prompter {mode}"
    ext = regional_prompter(server, mode)
    off = check_omega_one(server, ext, what, request=REGIONAL_REQUEST)
    assert "RP Active" in off.infotext, off.infotext
    assert generate(server, request=REGIONAL_REQUEST).pixels != off.pixels, "Regional Prompter did not change the image"
    check_weak_branch(server, ext, what, request=REGIONAL_REQUEST)
    check_guided(server, ext, off, what, request=REGIONAL_REQUEST)
    check_left_nothing(interop, what)


# ---- LoRA Block Weight ---------------------------------------------------------------------------
def lbw_request(multiplier, preset="OUTALL"):
    return {**REQUEST, "prompt": f"a photo of sks dog <lora:{LORA}:{multiplier}:lbw={preset}>"}


def test_lora_block_weight(interop):
    """LoRA Block Weight scales the LoRA's up weights per block (scripts/lora_block_weight.py lbw)
    and renames the loaded network. Bar 1 in webui's merged LoRA mode, base and strip modes; bar 2
    with the LoRA stripped in webui's functional LoRA mode, where the weak rows run the network at
    multiplier omega*m: webui's own `<lora:name:omega*m:lbw=...>` (bar 2's tolerance applies; merged
    mode's low-rank correction would add its own rounding)."""
    need(interop, LBW)
    server, what = interop.server, "LoRA Block Weight"
    status, body = h.request(server.url, "POST", "/sdapi/v1/refresh-loras")
    assert status == 200, body
    full = generate(server, request=lbw_request(1))
    plain_lora = generate(server, request={**REQUEST, "prompt": f"a photo of sks dog <lora:{LORA}:1>"})
    assert full.pixels != plain_lora.pixels, "the lbw preset did not change the LoRA's effect"
    for mode in ({"base": BASE}, {"strip_loras": True}):
        one = generate(server, pg(omega=1.0, **mode), request=lbw_request(1))
        assert one.pixels == full.pixels, f"{what} {mode}: PG at omega 1 must be plain CFG bit for bit"
        assert_no_skip_note(one, what)
        guided = generate(server, pg(omega=0.3, **mode), request=lbw_request(1))
        assert guided.pixels != full.pixels and "PG skipped" not in guided.infotext, (mode, pg_notes(guided))
    functional = settings(lora_functional=True, **NO_ROW_BATCH)
    weak = generate(server, WEAK_ONLY, functional, pg(omega=0.5, strip_loras=True), request=lbw_request("1.0"))
    reference = generate(server, WEAK_ONLY, functional, request=lbw_request("0.5"))
    difference = max_difference(weak.pixels, reference.pixels)
    print(f"\n[pg-e2e] {what}: weak branch (LoRA stripped to 0.5) vs the LoRA at 0.5: max pixel difference {difference}")
    assert difference <= WEAK_TOLERANCE, (
        f"{what}: stripping the lbw LoRA to omega 0.5 (functional mode, cfg_scale 0) differs from the LoRA at 0.5 "
        f"by up to {difference}")
    status, options = h.request(server.url, "GET", "/sdapi/v1/options")
    assert status == 200 and options.get("lora_functional") is False, options.get("lora_functional")
    check_left_nothing(interop, what)


def test_live_model_unchanged(interop):
    """Runs last: after every extension's requests, plain CFG is as at the start."""
    check_left_nothing(interop, "the module")
    status, options = h.request(interop.server.url, "GET", "/sdapi/v1/options")
    assert status == 200
    assert options["sd_model_checkpoint"].startswith(ACTIVE + ".safetensors"), options["sd_model_checkpoint"]
    for key in SETTLED_OPTIONS:
        if key != "sd_model_checkpoint" and key in interop.options:
            assert options.get(key) == interop.options[key], (key, options.get(key), interop.options[key])
