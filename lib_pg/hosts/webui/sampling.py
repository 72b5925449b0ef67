"""webui's sampler as PG sees it: a step's conditioning, webui's own rule for
skipping a step's unconditional pass, and the extensions that hook sampling."""

import os

from lib_pg.hosts.common.frontend import EXTENSION_FOLDER

from modules import script_callbacks, shared  # noqa: E402


def step_conditioning(params):
    """The step's (cond, uncond) text conditioning as the UNet will see it
    (SDXL's dict conditioning: its cross-attention tensor)."""
    def crossattn(c):
        return c["crossattn"] if isinstance(c, dict) else c

    return crossattn(params.text_cond), crossattn(params.text_uncond)


def webui_skips_uncond(params):
    """webui's name for skipping this step's unconditional pass, or None:
    the rule of modules/sd_samplers_cfg_denoiser.py CFGDenoiser.forward
    (Skip Early CFG, then NGMS), evaluated on the same inputs."""
    denoiser, opts = params.denoiser, shared.opts
    skip_early = getattr(opts, "skip_early_cond", 0) or 0
    if skip_early != 0 and denoiser.total_steps and denoiser.step / denoiser.total_steps <= skip_early:
        return "Skip Early CFG"
    s_min_uncond = getattr(denoiser.p, "s_min_uncond", 0) or 0
    if (denoiser.step % 2 or getattr(opts, "s_min_uncond_all", False)) and s_min_uncond > 0 and bool(params.sigma[0] < s_min_uncond):
        return "NGMS"
    return None


def extension_of(function):
    """The extensions/ folder name a function comes from, or None."""
    code = getattr(getattr(function, "__func__", function), "__code__", None)
    parts = os.path.normpath(code.co_filename).split(os.sep) if code is not None else []
    for marker in ("extensions", "extensions-builtin"):
        if marker in parts[:-1]:
            return parts[parts.index(marker) + 1]
    return None


def sampling_hooks(unet, denoiser=None):
    """Extensions that replaced a sampling or UNet forward (Tiled Diffusion
    replaces the denoiser's inner model forward, ControlNet the UNet's), or
    listen to the denoiser's steps: the candidates for evaluating rows where
    PG cannot see them."""
    found = []
    inner = getattr(denoiser, "model_wrap", None)  # webui's CFGDenoiserKDiffusion/Timesteps: the wrapped model, once built
    candidates = [unet.__dict__.get("forward"), getattr(shared.sd_model, "__dict__", {}).get("apply_model"),
                  getattr(inner, "__dict__", {}).get("forward")]
    for name in ("callbacks_cfg_denoiser", "callbacks_cfg_denoised", "callbacks_cfg_after_cfg"):
        candidates += [c.callback for c in script_callbacks.callback_map.get(name, ())]
    for function in candidates:
        extension = extension_of(function) if function is not None else None
        if extension and extension != EXTENSION_FOLDER and extension not in found:
            found.append(extension)
    return found
