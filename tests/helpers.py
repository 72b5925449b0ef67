"""Shared test fixtures: a tiny base model and a "DreamBooth" fine-tune of it."""

import copy

import torch

from tests.ldm_models import make_sd1


TEXT_ENCODERS = ("cond_stage_model.", "conditioner.embedders.")  # SD 1.x/2.x, SDXL


def fine_tune(base, seed=1, scale=0.02, text_encoder=False, unet=True):
    """A copy of `base` with perturbed weights, like a DreamBooth run would leave."""
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            touched = (unet and name.startswith("model.diffusion_model.")) or (text_encoder and name.startswith(TEXT_ENCODERS))
            if touched:
                param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * scale)
    return tuned


def make_pair(text_encoder=False, inpainting=False, dtype=torch.float32):
    base = make_sd1("tiny", seed=0, inpainting=inpainting, dtype=dtype)
    return base, fine_tune(base, text_encoder=text_encoder)


def interpolated_copy(base, tuned, omega):
    """θ_ω as a whole model, the slow obvious way (the reference for routing tests)."""
    weak = copy.deepcopy(tuned)
    with torch.no_grad():
        for (name, p_weak), p_base, p_tuned in zip(weak.named_parameters(), base.parameters(), tuned.parameters()):
            if name.startswith(("model.diffusion_model.", "cond_stage_model.")):
                p_weak.copy_(torch.lerp(p_base.float(), p_tuned.float(), omega).to(p_weak.dtype) if omega else p_base)
    return weak


def base_state(base):
    return {k: v.clone() for k, v in base.state_dict().items()}
