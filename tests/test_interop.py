"""PG next to extensions that change how a step reaches the UNet, through the
fake webui: Tiled Diffusion's tiles, PAG's extra call, ControlNet's cond/uncond
markers, ADetailer's passes, and an extension PG cannot follow."""

import copy

import pytest
import torch

from modules import script_callbacks, scripts, sd_samplers_common, shared

from lib_pg.hosts.webui import sampling as webui_sampling
from lib_pg.errors import PGError
from lib_pg.interop import CONTROLNET_MARK, carry_marks, controlnet_marks
from lib_pg.patching import module_state_fingerprint
from tests.helpers import interpolated_copy
from tests.test_script import Env, UNetRecorder as CallRecorder, pg_args, same_images


@pytest.fixture
def env(tmp_path):
    yield Env(tmp_path)
    shared.reset()


def check_rows(env, calls, omega):
    """Each recorded call's weak rows equal the weak model on them, its other rows the live model."""
    weak_unet = interpolated_copy(env.base_inner, env.tuned_inner, omega).model.diffusion_model
    weak_rows = 0
    with torch.no_grad():
        for x, t, context, output, plan in calls:
            weak = plan.weak if plan is not None else ()
            live = [i for i in range(x.shape[0]) if i not in weak]
            for rows, unet in ((live, env.unet), (list(weak), weak_unet)):
                if rows:
                    torch.testing.assert_close(output[rows], unet(x[rows], t[rows], context=context[rows]), rtol=1e-5, atol=1e-5)
            weak_rows += len(weak)
    return weak_rows


def tiled(tiles, tile_batch):
    """Tiled Diffusion's way of evaluating a step (tile_methods/multidiffusion.py,
    kdiff_forward): the latent is cut into tiles along its width; each UNet call
    holds `tile_batch` tiles, every tile with all of the step's rows
    ([tile 1: cond…, uncond…, tile 2: …]) and the conditioning repeated."""
    plain_call = sd_samplers_common.CompVisDenoiserLike.__call__

    def call(self, x, sigma, cond):
        width = x.shape[-1] // tiles
        out = torch.empty_like(x)
        for first in range(0, tiles, tile_batch):
            group = range(first, min(first + tile_batch, tiles))
            x_tiles = torch.cat([x[..., i * width:(i + 1) * width] for i in group])
            image_cond = cond["c_concat"][0]  # txt2img's is a 1×1 placeholder: repeated, not cut
            tiles_of_image_cond = [image_cond[..., i * width:(i + 1) * width] if image_cond.shape[-1] == x.shape[-1] else image_cond
                                   for i in group]
            repeated = {"c_crossattn": [cond["c_crossattn"][0].repeat(len(group), 1, 1)], "c_concat": [torch.cat(tiles_of_image_cond)]}
            tile_out = plain_call(self, x_tiles, sigma.repeat(len(group)), cond=repeated)
            for k, i in enumerate(group):
                out[..., i * width:(i + 1) * width] = tile_out[k * x.shape[0]:(k + 1) * x.shape[0]]
        return out

    return call


@pytest.mark.parametrize("tile_batch", [1, 2])
@pytest.mark.parametrize("batch_cond_uncond", [True, False])
def test_every_tile_is_guided(env, monkeypatch, tile_batch, batch_cond_uncond):
    shared.opts.batch_cond_uncond = batch_cond_uncond
    monkeypatch.setattr(sd_samplers_common.CompVisDenoiserLike, "__call__", tiled(2, tile_batch))
    before = module_state_fingerprint(env.tuned_inner)
    plain, _ = env.generate(batch_size=2, width=64, steps=2)
    same, _ = env.generate(pg_args(1.0), batch_size=2, width=64, steps=2)
    assert same_images(plain, same), "ω = 1 must be bit-identical to PG disabled"

    recorder = CallRecorder(env.unet)
    guided, _ = env.generate(pg_args(0.3), batch_size=2, steps=2, width=64)
    recorder.remove()
    # 2 steps × 2 tiles × 2 unconditional rows, each on the weak weights
    assert check_rows(env, recorder.calls, 0.3) == 2 * 2 * 2
    assert "PG skipped" not in guided.infotexts[0]
    assert module_state_fingerprint(env.tuned_inner) == before


def test_an_extra_conditional_call_runs_live_and_is_not_reported(env):
    """Incantations' PAG: one more UNet call per step, on the conditional rows, from on_cfg_denoised."""
    seen = {}

    def remember(params):
        seen.update(x=params.x, sigma=params.sigma, cond=params.text_cond, image_cond=params.image_cond)

    def extra_call(params):
        rows = seen["cond"].shape[0]
        params.inner_model(seen["x"][:rows], seen["sigma"][:rows],
                           cond={"c_crossattn": [seen["cond"]], "c_concat": [seen["image_cond"][:rows]]})

    script_callbacks.on_cfg_denoiser(remember, name="pag-like")
    script_callbacks.on_cfg_denoised(extra_call, name="pag-like")
    recorder = CallRecorder(env.unet)
    guided, _ = env.generate(pg_args(0.3), steps=2)
    recorder.remove()
    assert len(recorder.calls) == 4 and [len(c[4].weak) if c[4] else 0 for c in recorder.calls] == [1, 0, 1, 0]
    assert check_rows(env, recorder.calls, 0.3) == 2
    assert "PG skipped" not in guided.infotexts[0]


def controlnet_like(env, monkeypatch, seen_marks):
    """sd-webui-controlnet's protocol (scripts/hook.py): every prompt's conditioning
    carries a leading marker token (+1024 conditional, −1024 unconditional); its
    UNet forward strips it and, when not every row is marked, treats all rows as
    conditional ("ControlNet is more important" then controls them all)."""
    def mark(params):
        params.text_cond = torch.cat([torch.full_like(params.text_cond[:, :1], CONTROLNET_MARK), params.text_cond], 1)
        params.text_uncond = torch.cat([torch.full_like(params.text_uncond[:, :1], -CONTROLNET_MARK), params.text_uncond], 1)

    script_callbacks.on_cfg_denoiser(mark, name="controlnet-like")  # before PG's, as ControlNet marks p's conds first
    unet_forward = env.unet.forward

    def forward(x, timesteps=None, context=None, **kwargs):
        marks = controlnet_marks(context)
        seen_marks.append(None if marks is None else marks[:, 0, 0].tolist())
        return unet_forward(x, timesteps, context=context[:, 1:] if marks is not None else context, **kwargs)

    monkeypatch.setattr(env.unet, "forward", forward)


@pytest.mark.parametrize("text_encoder", [False, True])
def test_controlnet_marks_survive_pg_weak_conditioning(tmp_path, monkeypatch, text_encoder):
    env = Env(tmp_path, text_encoder=text_encoder)
    seen = []
    controlnet_like(env, monkeypatch, seen)
    recorder = CallRecorder(env.unet)
    # the weak prompt "empty" (and a fine-tuned text encoder) make PG compute its own text_uncond
    env.generate(pg_args(0.3, weak_prompt="empty"), steps=2)
    recorder.remove()
    assert seen == [[CONTROLNET_MARK, -CONTROLNET_MARK]] * 2, "every row must reach ControlNet marked as what it is"
    assert [c[4].weak for c in recorder.calls] == [(1,), (1,)]
    shared.reset()


def test_carry_marks_copies_the_marker_token_only_where_every_row_has_one():
    ours = torch.randn(2, 77, 8)
    marked = torch.cat([torch.tensor([-CONTROLNET_MARK, CONTROLNET_MARK]).view(2, 1, 1).expand(2, 1, 8), torch.randn(2, 77, 8)], 1)
    carried = carry_marks(marked, ours)
    assert carried.shape == (2, 78, 8) and torch.equal(carried[:, :1], marked[:, :1]) and torch.equal(carried[:, 1:], ours)
    assert carry_marks(torch.randn(2, 78, 8), ours) is ours  # nothing marked: nothing to carry
    assert carry_marks(marked, marked) is marked  # already marked
    class DictWithShape(dict):  # webui's SDXL conditioning type (modules/prompt_parser.py)
        @property
        def shape(self):
            return self["crossattn"].shape

    ours_xl = DictWithShape(crossattn=ours, vector=torch.zeros(2, 4))
    sdxl = carry_marks({"crossattn": marked, "vector": torch.ones(2, 4)}, ours_xl)
    assert type(sdxl) is DictWithShape and sdxl.shape == (2, 78, 8)
    assert torch.equal(sdxl["crossattn"], carried) and torch.equal(sdxl["vector"], torch.zeros(2, 4))
    assert ours_xl["crossattn"] is ours  # PG's cached conditioning is not changed
    assert carry_marks({"crossattn": torch.randn(2, 78, 8)}, ours_xl) is ours_xl


def test_unconditional_rows_pg_cannot_recognise_stop_the_generation(env, monkeypatch):
    """An extension that evaluates the unconditional rows on conditioning of its
    own: PG stops rather than run the step without guidance, and leaves nothing behind."""
    plain_call = sd_samplers_common.CompVisDenoiserLike.__call__

    def altered(self, x, sigma, cond):
        return plain_call(self, x, sigma, cond={**cond, "c_crossattn": [cond["c_crossattn"][0] * 1.0001]})

    monkeypatch.setattr(sd_samplers_common.CompVisDenoiserLike, "__call__", altered)
    before = module_state_fingerprint(env.tuned_inner)
    with pytest.raises(PGError, match="another extension evaluates them"):
        env.generate(pg_args(0.3), steps=3)
    assert module_state_fingerprint(env.tuned_inner) == before
    assert not env.pg_callbacks()
    plain, _ = env.generate(steps=3)  # PG off: the extension runs as it would without PG
    assert plain.images


class ADetailerLike(scripts.Script):
    """What PG reads of ADetailer (scripts/!adetailer.py): its file name and is_ad_enabled()."""

    enabled = True

    def title(self):
        return "ADetailer"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def is_ad_enabled(self, *args):
        return self.enabled

    def postprocess_image(self, p, pp, *args):
        # After its passes ADetailer runs every always-on script's process()
        # again on a shallow copy of p (scripts/!adetailer.py, need_call_process).
        if self.enabled:
            again = copy.copy(p)
            p.scripts.before_process(again)
            p.scripts.process(again)


@pytest.mark.parametrize("script_names, enabled, said", [
    (None, True, True),  # ADetailer's default list leaves PG out
    ("dynamic_thresholding,personalization_guidance", True, False),
    (None, False, False),  # ADetailer off for this generation
])
def test_adetailer_passes_without_pg_are_said(env, monkeypatch, script_names, enabled, said):
    from tests.test_script import generate_with  # noqa: PLC0415

    if script_names is not None:
        shared.opts.data["ad_script_names"] = script_names
    monkeypatch.setattr(ADetailerLike, "enabled", enabled)
    original_add = scripts.ScriptRunner.add_script

    def add_both(runner, script, **kwargs):
        added = original_add(runner, script, **kwargs)
        if not any(type(s) is ADetailerLike for s in runner.alwayson_scripts):
            original_add(runner, ADetailerLike, filename="/webui/extensions/adetailer/scripts/!adetailer.py")
        return added

    monkeypatch.setattr(scripts.ScriptRunner, "add_script", add_both)
    result, _ = generate_with(env.script_module, pg_args(0.3), steps=2)
    info = result.infotexts[0]
    assert ("ADetailer passes" in info and "personalization_guidance" in info) == said, info


def test_the_stop_message_names_the_extensions_that_hook_sampling(env, monkeypatch):
    """The callbacks, and instance forwards replaced on the UNet or the denoiser's model, of
    functions whose files lie under an extensions/ folder are named; PG's own are not."""
    plain_call = sd_samplers_common.CompVisDenoiserLike.__call__

    def altered(self, x, sigma, cond):
        return plain_call(self, x, sigma, cond={**cond, "c_crossattn": [cond["c_crossattn"][0] * 1.0001]})

    monkeypatch.setattr(sd_samplers_common.CompVisDenoiserLike, "__call__", altered)
    namespace = {}
    exec(compile("def on_step(params):\n    pass\n", "/webui/extensions/some-tiler/scripts/tiler.py", "exec"), namespace)
    script_callbacks.on_cfg_denoiser(namespace["on_step"], name="some-tiler")
    with pytest.raises(PGError) as raised:
        env.generate(pg_args(0.3), steps=2)
    message = str(raised.value)
    assert "(some-tiler)" in message and "stops the generation" in message, message
    assert webui_sampling.extension_of(namespace["on_step"]) == "some-tiler"
    assert webui_sampling.extension_of(test_the_stop_message_names_the_extensions_that_hook_sampling) is None
