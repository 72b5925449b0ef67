"""What Forge and Forge Neo share about their engine (backend/diffusion_engine/: a
ForgeDiffusionEngine, not an nn.Module), as PG sees it.

Both keep the UNet as `forge_objects.unet.model.diffusion_model` (ldm names) and the text
encoders as `forge_objects.clip.cond_stage_model`, a JointTextEncoder of IntegratedCLIPs
(backend/nn/clip.py: the Hugging Face text model as `.transformer`, its own `logit_scale`, a
Linear `transformer.text_projection`). SD 1.x is seen through `LdmView` (ldm's layout, so an SD
1.x checkpoint's keys match); every other family PG covers in the engine's own key space
(lib_pg.hosts.common.forks NativeView), a base checkpoint's text encoders converted by the
engine's own huggingface_guess config (`engine.model_config.process_clip_state_dict`, as
backend/loader.py split_state_dict converts them before loading). Each fork's controller names
its engines (`NATIVE_ENGINES`) and its patcher; loading the text encoder (a `backend` call) stays
in each fork's folder.
"""

import os

import torch

from lib_pg.errors import PGError
from lib_pg.weights import read_checkpoint


class LdmView(torch.nn.Module):
    """An SD 1.x engine's UNet and text encoder under ldm's names (shares their modules, owns nothing)."""

    def __init__(self, engine):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.diffusion_model = engine.forge_objects.unet.model.diffusion_model
        self.cond_stage_model = engine.forge_objects.clip.cond_stage_model.clip_l


def checkpoint_keys(path):
    """The tensor names of a .safetensors file (without reading its tensors), else None."""
    if path.lower().endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            return set(f.keys())
    return None


class ForgeEngineParts:
    """The lib_pg.hosts.common.forks.ForkController methods Forge and Neo implement alike (mixed in
    before ForkController). `NATIVE_ENGINES`: the engine class names seen in the fork's own key space."""

    NATIVE_ENGINES = ()
    FAMILIES = "SD 1.x"  # what the refusal of another family names as supported

    def check_family(self, engine):
        """Refuses engines PG does not cover (SD 1.x's `StableDiffusion`, backend/diffusion_engine/
        sd15.py, and `NATIVE_ENGINES`) and inpainting models."""
        family = type(engine).__name__
        inpaint = getattr(engine, "is_inpaint", False)
        if family not in ("StableDiffusion",) + self.NATIVE_ENGINES or inpaint:
            raise PGError(f"this model's family ({family}{' inpainting' if inpaint else ''}) "
                          f"is not supported by PG on {self.HOST}; supported: {self.FAMILIES}")

    def ldm_view(self, engine):
        return LdmView(engine)

    def native(self, engine):
        return type(engine).__name__ in self.NATIVE_ENGINES

    def convert_text(self, engine):
        """huggingface_guess model_list <family>.process_clip_state_dict of the engine's own guess
        (backend/diffusion_engine/base.py keeps it as `model_config`), as backend/loader.py
        split_state_dict converts the text encoders before loading them."""
        return engine.model_config.process_clip_state_dict

    def cache_identity(self, engine):
        return (id(engine.forge_objects.unet.model),)

    def read_base(self, path):
        return read_checkpoint(path)  # these forks' sd_models.read_state_dict is a stub or gone

    def host_parameters(self, engine):
        """The engine's own parameters (IntegratedCLIP's logit_scale): in the live model, in no checkpoint file."""
        active = getattr(engine, "sd_checkpoint_info", None)
        active_keys = checkpoint_keys(active.filename) if active is not None and os.path.isfile(active.filename) else None
        return lambda key: active_keys is not None and key not in active_keys

    def adjust_weak(self, weak):
        for layer in weak.text:
            # backend/text_processing/classic_engine.py CLIPEmbeddingForTextualInversion registers the
            # embedding's weight as its own parameter too; the forward reads the wrapped one's.
            if type(layer.module).__name__ == "CLIPEmbeddingForTextualInversion":
                layer.module = layer.module.wrapped
                layer._fixed_swaps = None
