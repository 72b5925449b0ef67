"""PG on Forge (lllyasviel/stable-diffusion-webui-forge, its `backend/` since 2024-08).

Forge keeps webui's front end (processing, scripts, prompt_parser, the
on_cfg_denoiser callback) but `shared.sd_model` is a ForgeDiffusionEngine, not an
nn.Module: the UNet is `forge_objects.unet.model.diffusion_model` (ldm names)
and the SD 1.x text encoder `forge_objects.clip.cond_stage_model.clip_l`
(`transformer.text_model...`). PG looks at them through an nn.Module view with
ldm's layout (`model.diffusion_model`, `cond_stage_model`), so checkpoint keys
match by name, and reads base checkpoints itself (Forge's
sd_models.read_state_dict is a stub). Sampling is tagged as on reForge
(backend/sampling/sampling_function.py calc_cond_uncond_batch,
`transformer_options["cond_or_uncond"]`).

Supported here: SD 1.x, SDXL (eps and v-prediction) and SD 2.x, with a base
checkpoint (exact or lean) and/or LoRAs to strip, as on reForge. LoRAs come
from Forge's own patch lists (`lora_patches`, one entry per LoRA file) and are
merged with its merge_lora_to_weight. The views, the base checkpoint's reading
and conversion are what Forge shares with Neo (lib_pg.hosts.common.forge_engine).
SDXL and SD 2.x are seen in Forge's own
key space (lib_pg.hosts.common.forks NativeView over
`forge_objects.clip.cond_stage_model`, a JointTextEncoder{clip_l, clip_g} of
IntegratedCLIPs in Hugging Face layout, clip_g's projection the Linear
`clip_g.transformer.text_projection`); a base checkpoint's text encoders are
converted with the engine's own huggingface_guess config
(`engine.model_config.process_clip_state_dict`, as backend/loader.py
split_state_dict does). Refused by name: other engines (the SDXL refiner, SD3,
Flux, ...), inpainting models, quantized UNets, online LoRAs.
"""

import torch

from lib_pg.errors import PGError
from lib_pg.hosts.common.fork_loras import PatcherLoras
from lib_pg.hosts.common.forge_engine import ForgeEngineParts
from lib_pg.hosts.common.forks import ForkController

# backend/diffusion_engine/sdxl.py, sd20.py: seen in Forge's own key space
NATIVE_ENGINES = ("StableDiffusionXL", "StableDiffusion2")
QUANTIZED_STORAGE = ("nf4", "fp4", "gguf")


class ForgeController(ForgeEngineParts, ForkController):
    HOST = "Forge"
    NATIVE_ENGINES = NATIVE_ENGINES
    FAMILIES = "SD 1.x, SDXL, SD 2.x"

    def check_model(self, engine):
        self.check_family(engine)
        storage = getattr(engine.forge_objects.unet.model, "storage_dtype", None)
        if str(storage) in QUANTIZED_STORAGE:
            raise PGError(f"a quantized UNet ({storage}) is not supported by PG on {self.HOST}")

    def lora_patchers(self, engine, stripped_files):
        """Forge's `lora_patches` name each LoRA by its file (backend/patcher/base.py add_patches):
        the reference keeps every LoRA whose file is not stripped, in the order
        LoraLoader.refresh concatenates them (backend/patcher/lora.py); the originals are the
        loader's backups, else the parameters."""
        from backend import utils
        from backend.patcher.lora import merge_lora_to_weight

        def merge(entries, weight, key):
            return merge_lora_to_weight(entries, weight, key, computation_dtype=torch.float32)

        objects = engine.forge_objects
        found = []
        for patcher in (objects.unet, objects.clip.patcher):
            live, reference = {}, {}
            for (filename, _strength, _strength_model, online), patches in patcher.lora_patches.items():
                if online and patches:
                    raise PGError(f"LoRAs applied online (Forge's online LoRA, for a {objects.unet.model.storage_dtype} UNet) "
                                  f"are not supported by PG on {self.HOST}")
                for key, entries in patches.items():
                    live.setdefault(key, []).extend(entries)
                    if filename not in stripped_files:
                        reference.setdefault(key, []).extend(entries)
            backup = patcher.lora_loader.backup

            def original(key, backup=backup, model=patcher.model):
                weight = backup.get(key)
                return weight if weight is not None else utils.get_attr(model, key)

            found.append(PatcherLoras(patcher.model, live, reference, original, merge, frozenset(backup)))
        return found

    def lora_signature(self, engine):
        objects = engine.forge_objects
        return (getattr(engine, "current_lora_hash", None), str(list(objects.unet.lora_patches)),
                str(list(objects.clip.patcher.lora_patches)))

    def load_text_encoder(self, engine):
        from backend import memory_management

        memory_management.load_model_gpu(engine.forge_objects.clip.patcher)


CONTROLLER = ForgeController()
