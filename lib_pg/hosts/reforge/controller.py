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

Supported here: SD 1.x, SDXL (eps and v-prediction) and SD 2.x models, with a
base checkpoint (exact or lean) and/or LoRAs to strip. LoRAs come from
reForge's own patch lists (found per LoRA by position) and are merged with its
calculate_weight. SDXL and SD 2.x are seen in reForge's own key space
(lib_pg.hosts.common.forks NativeView: their text encoders are converted at
load, `SDXLClipModel{clip_l, clip_g}` in Hugging Face layout, so ldm keys no
longer match them); a base checkpoint's text encoders are converted with the
live model's `model_config.process_clip_state_dict`. SDXL's pooled vector comes
from clip_g through its bare `text_projection` Parameter, which the front end's
embedder registers too (modules_forge/forge_loader.py:478; read at
modules_forge/forge_clip.py:121-122): both registrations are swapped.
Refused by name: other families and variants (refiner, inpainting, edit, SD3,
SSD-1B-style distills, flux2-latent SDXL), a compiled UNet, LoRAs on a UNet
loaded in low-VRAM mode.
"""

import ast
import sys

import torch

from lib_pg.errors import PGError
from lib_pg.hosts.common.fork_loras import PatcherLoras, split_patches_by_lora
from lib_pg.hosts.common.forks import ForkController

from modules import sd_models  # noqa: E402

# reForge's backend model classes (ldm_patched/modules/supported_models.py) PG supports: SD 1.x
# through the ldm view, the others in reForge's own key space.
SUPPORTED_FAMILIES = ("SD15",)
NATIVE_FAMILIES = ("SDXL", "SD20")
FAMILY_NAMES = {"SD15": "SD 1.x", "SDXL": "SDXL", "SD20": "SD 2.x"}
# Parameters reForge's CLIP text model has that no SD 1.x checkpoint holds
# (ldm_patched/modules/clip_model.py CLIPTextModel.text_projection): the same in
# the live and the base model, so they are taken from the live model.
SYNTHESIZED_SUFFIXES = (".transformer.text_projection.weight",)


def backend_family(model):
    unet = getattr(getattr(model, "forge_objects", None), "unet", None)
    config = getattr(getattr(unet, "model", None), "model_config", None)
    return type(config).__name__ if config is not None else None


def lora_targets(model):
    """[(file, UNet strength, text-encoder strength)] of the prompt's LoRAs in the order reForge's
    Lora extension loaded them (extensions-builtin/Lora/networks.py load_networks keeps str() of
    that list as `current_lora_hash`)."""
    text = getattr(model, "current_lora_hash", None)
    if not text:
        return []
    try:
        return [(t[0], t[1], t[2]) for t in ast.literal_eval(text)]
    except (ValueError, SyntaxError, TypeError, IndexError):
        raise PGError(f"cannot read reForge's LoRA state (current_lora_hash {text[:80]!r})") from None


class ReForgeController(ForkController):
    HOST = "reForge"

    def check_model(self, model):
        family = backend_family(model)
        if getattr(model, "is_sd3", False) or family not in SUPPORTED_FAMILIES + NATIVE_FAMILIES:
            raise PGError(f"this model's family ({family or 'unknown'}) is not supported by PG on {self.HOST}; "
                          "supported: SD 1.x, SDXL, SD 2.x")
        in_channels = getattr(model.forge_objects.unet.model.diffusion_model, "in_channels", 4)
        if family in NATIVE_FAMILIES and in_channels != 4:
            raise PGError(f"{FAMILY_NAMES[family]} inpainting/edit models ({in_channels} input channels) are not supported by PG "
                          f"on {self.HOST}")
        if getattr(model, "cond_stage_key", None) == "edit":
            raise PGError("InstructPix2Pix-style edit models are not supported: their unconditional branch is an image-conditioned one")
        if getattr(model.forge_objects.unet, "compiled", False):
            raise PGError(f"a compiled UNet (--torch-compile) is not supported by PG on {self.HOST}")

    def lora_patchers(self, model, stripped_files):
        """reForge's `patches` lists carry no LoRA identity (ldm_patched/modules/model_patcher.py
        add_patches): a key's entries are the original patcher's own, then one per LoRA mapping
        onto the key, in load order (ldm_patched/modules/sd.py load_lora_for_models, once per
        LoRA of `current_lora_hash`). Each LoRA's keys come from reForge's own loader functions;
        a count that does not add up stops the generation rather than guess."""
        from ldm_patched import float as ldm_float
        from ldm_patched.modules import lora as ldm_lora
        from ldm_patched.modules import lora_convert, utils
        from ldm_patched.modules.model_patcher import string_to_seed

        objects, originals = model.forge_objects, model.forge_objects_original
        unet, clip = objects.unet, objects.clip.patcher
        targets = lora_targets(model)
        networks = sys.modules.get("networks")
        load_state = getattr(networks, "load_lora_state_dict", None) or (lambda f: utils.load_torch_file(f, safe_load=True))
        key_map = ldm_lora.model_lora_keys_unet(unet.model, {})
        key_map = ldm_lora.model_lora_keys_clip(objects.clip.cond_stage_model, key_map)
        counted = []  # per LoRA: (file, ({UNet key: entries it adds}, {text-encoder key: entries it adds}))
        for filename, strength_unet, strength_text in targets:
            loaded = ldm_lora.load_lora(lora_convert.convert_lora(load_state(filename)), key_map, log_missing=False)
            counts = ({}, {})
            for index, (patcher, strength) in enumerate(((unet, strength_unet), (clip, strength_text))):
                if strength == 0:
                    continue  # load_lora_for_models maps no key of a part at strength 0
                model_keys = patcher.model.state_dict().keys()
                for k in loaded:
                    key = k if isinstance(k, str) else k[0]
                    if key in model_keys:
                        counts[index][key] = counts[index].get(key, 0) + 1
            counted.append((filename, counts))

        def merge(entries, weight, key):
            # as ModelPatcher.patch_weight_to_device: a float32 copy, calculate_weight, rounded to the dtype
            merged = ldm_lora.calculate_weight(entries, weight.to(torch.float32, copy=True), key)
            return ldm_float.stochastic_rounding(merged, weight.dtype, seed=string_to_seed(key))

        found = []
        for index, (patcher, original_patcher) in enumerate(((unet, originals.unet), (clip, originals.clip.patcher))):
            live, reference = split_patches_by_lora(patcher.patches, original_patcher.patches, counted, index,
                                                    stripped_files, "reForge")
            backup = patcher.backup

            def original(key, backup=backup, model=patcher.model):
                saved = backup.get(key)
                return saved.weight if saved is not None else utils.get_attr(model, key)

            found.append(PatcherLoras(patcher.model, live, reference, original, merge, frozenset(backup)))
        return found

    def lora_signature(self, model):
        objects = model.forge_objects
        return (getattr(model, "current_lora_hash", None), objects.unet.patches_uuid, objects.clip.patcher.patches_uuid)

    def check_routed_modules(self, layers):
        """In low VRAM reForge leaves a layer's LoRA to its `weight_function`, applied in the forward
        to whatever weight the layer holds (model_patcher.py load, LowVramPatch): it would be applied
        again on top of the weak weight."""
        for layer in layers:
            functions = layer.module.__dict__
            if functions.get("weight_function") or functions.get("bias_function"):
                raise PGError(f"{self.HOST} loaded the UNet in low-VRAM mode, applying the LoRAs in each layer's forward: "
                              "PG does not support LoRAs then; free GPU memory (or use a base checkpoint without LoRAs)")

    def native(self, model):
        return backend_family(model) in NATIVE_FAMILIES

    def convert_text(self, model):
        """ldm_patched/modules/supported_models.py SDXL/SD20.process_clip_state_dict, as
        load_checkpoint_guess_config converts the text encoders before clip.load_sd."""
        return model.forge_objects.unet.model.model_config.process_clip_state_dict

    def alias_root(self, model):
        """The front end's conditioner (an nn.Module tree over the backend's text encoders) registers
        clip_g's `text_projection` on its FrozenOpenCLIPEmbedder2 too (forge_loader.py:478)."""
        conditioner = getattr(model, "conditioner", None) if self.native(model) else None
        return conditioner if isinstance(conditioner, torch.nn.Module) else None

    def read_base(self, path):
        return sd_models.read_state_dict(path, map_location="cpu")

    def host_parameters(self, model):
        return lambda key: key.endswith(SYNTHESIZED_SUFFIXES)

    def load_text_encoder(self, model):
        """As reForge loads it before encoding (modules_forge/forge_clip.py move_clip_to_gpu)."""
        from ldm_patched.modules import model_management

        model_management.load_model_gpu(model.forge_objects.clip.patcher)


CONTROLLER = ReForgeController()
