"""PG on reForge (Panchovix/stable-diffusion-webui-reForge, ldm_patched backend).

reForge keeps webui's front end (modules/processing.py, scripts, prompt_parser,
sd_models.read_state_dict, the on_cfg_denoiser callback) and an ldm-shaped
`shared.sd_model` whose `model.diffusion_model` is the backend's own UNet
module (modules_forge/forge_loader.py load_model_for_a1111) and whose
`cond_stage_model.wrapped.transformer` is the backend's CLIP text model. So
parameter names and base checkpoints work as on webui (ldm keys), and only
sampling differs: the CFG denoiser hands B rows to
ldm_patched/modules/samplers.py sampling_function, whose calc_cond_batch tags
each chunk of a UNet call in transformer_options["cond_or_uncond"]
(lib_pg.hosts.common.forks and lib_pg.forks).

Supported here: SD 1.x models with a base checkpoint. Refused by name: other
families (their text encoders are converted at load, so ldm keys no longer
match them), LoRAs to strip and LoRAs in the prompt (reForge merges them into
the weights when it loads the model for sampling, after PG would have built the
weak weights), a compiled UNet.
"""

from lib_pg.errors import PGError
from lib_pg.hosts.common.forks import ForkController

from modules import sd_models  # noqa: E402

# reForge's backend model classes (ldm_patched/modules/supported_models.py) PG supports.
SUPPORTED_FAMILIES = ("SD15",)
# Parameters reForge's CLIP text model has that no SD 1.x checkpoint holds
# (ldm_patched/modules/clip_model.py CLIPTextModel.text_projection): the same in
# the live and the base model, so they are taken from the live model.
SYNTHESIZED_SUFFIXES = (".transformer.text_projection.weight",)


def backend_family(model):
    unet = getattr(getattr(model, "forge_objects", None), "unet", None)
    config = getattr(getattr(unet, "model", None), "model_config", None)
    return type(config).__name__ if config is not None else None


class ReForgeController(ForkController):
    HOST = "reForge"

    def check_model(self, model):
        family = backend_family(model)
        if getattr(model, "is_sd3", False) or family not in SUPPORTED_FAMILIES:
            raise PGError(f"this model's family ({family or 'unknown'}) is not supported by PG on {self.HOST}; "
                          "supported: SD 1.x")
        if getattr(model, "cond_stage_key", None) == "edit":
            raise PGError("InstructPix2Pix-style edit models are not supported: their unconditional branch is an image-conditioned one")
        if getattr(model.forge_objects.unet, "compiled", False):
            raise PGError(f"a compiled UNet (--torch-compile) is not supported by PG on {self.HOST}")

    def has_lora_patches(self, model):
        """Whether reForge's LoRA loading left patches for the UNet or the text encoder."""
        objects = model.forge_objects
        return bool(getattr(objects.unet, "patches", None) or getattr(getattr(objects.clip, "patcher", None), "patches", None))

    def read_base(self, path):
        return sd_models.read_state_dict(path, map_location="cpu")

    def host_parameters(self, model):
        return lambda key: key.endswith(SYNTHESIZED_SUFFIXES)

    def load_text_encoder(self, model):
        """As reForge loads it before encoding (modules_forge/forge_clip.py move_clip_to_gpu)."""
        from ldm_patched.modules import model_management

        model_management.load_model_gpu(model.forge_objects.clip.patcher)


CONTROLLER = ReForgeController()
