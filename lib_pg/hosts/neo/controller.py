"""PG on Forge Neo (Haoming02's `neo` line of Forge; tested: release 2.26).

Neo keeps Forge's front end and engine: webui's processing, scripts,
prompt_parser and on_cfg_denoiser callback; `shared.sd_model` a
ForgeDiffusionEngine (`StableDiffusion` for SD 1.x, backend/diffusion_engine/
sd15.py) whose UNet is `forge_objects.unet.model.diffusion_model` (ldm names)
and whose text encoder is `forge_objects.clip.cond_stage_model.clip_l`; its
sampling tags each chunk of a UNet call in `transformer_options["cond_or_uncond"]`
(backend/sampling/sampling_function.py), so lib_pg.hosts.common.forks works as
on Forge (SDXL's pooled vector is the `y` of each chunk's model_conds,
backend/sampling/condition.py:107-110). What Neo rewrote is the model patcher (backend/patcher/base.py, after
ComfyUI's): per-key `patches[key] = [(strength, adapter, strength_model, offset,
function, online_mode), ...]` with no LoRA file named, `backup[key]` a
(weight, inplace_update) namedtuple, merges through
backend/patcher/lora.py merge_lora_to_weight then backend/float.py
stochastic_rounding, and LoRAs left to a layer's `weight_function` (LowVramPatch)
in online and low-VRAM modes. PG reads those lists as on reForge: each LoRA's
entries found by position, counted by replaying Neo's own
`load_lora_for_models` (extensions-builtin/sd_forge_lora/networks.py) over the
original patchers, and merges with Neo's own functions.

Supported here: SD 1.x and SDXL (eps, v-prediction and rectified-flow SDXL;
backend/diffusion_engine/sdxl.py StableDiffusionXL), with a base checkpoint
(exact or lean weak weights: the forks' lean path, common/forks.py, whose
corrections go on Neo's own backend/operations.py ForgeOperations.Linear/Conv2d,
nn.Linear/nn.Conv2d subclasses computing F.linear/F.conv2d of their weight) and/or LoRAs to strip (and LoRAs in the prompt). SDXL is
seen in Neo's own key space as on Forge (lib_pg.hosts.common.forks NativeView
over `forge_objects.clip.cond_stage_model`, a JointTextEncoder{clip_l, clip_g} of
IntegratedCLIPs in Hugging Face layout; a base checkpoint's text encoders
converted by the engine's own huggingface_guess `model_config.process_clip_state_dict`,
modules_forge/packages/huggingface_guess/model_list.py:211-217, as backend/loader.py
split_state_dict does); the views and the base's reading are what Neo shares with
Forge (lib_pg.hosts.common.forge_engine). Refused by name before sampling: other
families (the SDXL refiner, Mugen, Flux, ...), inpainting models, UNets
whose weights are not plain fp32/fp16/bf16 tensors (nf4/fp4/gguf, fp8 storage,
mixed-precision QuantizedTensor, int8, nunchaku SVDQ), the torch.compile
script's swap, the fast refiner swap (it loads the refiner's weights into the
same UNet mid-sampling), online LoRA, and (at the first UNet call) LoRAs Neo
left to a layer's forward in low-VRAM mode.
"""

import ast
import contextlib
import logging
import sys

import torch

from lib_pg.errors import PGError
from lib_pg.hosts.common.fork_loras import PatcherLoras, split_patches_by_lora
from lib_pg.hosts.common.forge_engine import ForgeEngineParts
from lib_pg.hosts.common.forks import ForkController

from modules import shared  # noqa: E402

# backend/diffusion_engine/sdxl.py:15 StableDiffusionXL (eps, v-prediction and rectified-flow SDXL: the
# guess's model type picks the predictor, the weights are laid out alike): seen in Neo's own key space
NATIVE_ENGINES = ("StableDiffusionXL",)
DENSE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# backend/patcher/lora.py and extensions-builtin/sd_forge_lora/networks.py log under this name
# (one line per LoRA and patcher): PG's replay of the LoRA loading is kept out of the console.
LORA_LOGGER = "lora"
# extensions-builtin/sd_forge_compile/scripts/compile.py: the KModel attribute holding the
# apply_model it wrapped with torch.compile.
COMPILE_WRAPPED = "_orig_apply_model"


def lora_targets(engine):
    """[(file, UNet strength, text-encoder strength, online)] of the prompt's LoRAs in the order
    Neo loaded them (networks.py load_networks keeps str() of that list as `current_lora_hash`)."""
    text = getattr(engine, "current_lora_hash", None)
    if not text:
        return []
    try:
        return [(t[0], t[1], t[2], bool(t[3]) if len(t) > 3 else False) for t in ast.literal_eval(text)]
    except (ValueError, SyntaxError, TypeError, IndexError):
        raise PGError(f"cannot read Forge Neo's LoRA state (current_lora_hash {text[:80]!r})") from None


@contextlib.contextmanager
def quiet(logger_name):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def not_dense(module):
    """(name, what) of the first parameter that is not a plain fp32/fp16/bf16 tensor, else None."""
    for name, param in module.named_parameters():
        data = param.data
        if type(data) is not torch.Tensor:
            return name, type(data).__name__
        if data.dtype not in DENSE_DTYPES:
            return name, str(data.dtype).replace("torch.", "")
    return None


class NeoController(ForgeEngineParts, ForkController):
    HOST = "Forge Neo"
    NATIVE_ENGINES = NATIVE_ENGINES
    FAMILIES = "SD 1.x, SDXL"

    # -- what PG refuses ---------------------------------------------------
    def check_model(self, engine):
        self.check_family(engine)
        from backend.args import dynamic_args

        kmodel = engine.forge_objects.unet.model
        if getattr(dynamic_args, "nunchaku", False):
            raise PGError(f"a nunchaku (SVDQ) UNet is not supported by PG on {self.HOST}")
        storage = getattr(kmodel, "storage_dtype", None)
        if storage is not None and storage not in DENSE_DTYPES:
            raise PGError(f"a quantized UNet (storage {str(storage).replace('torch.', '')}) is not supported by PG on "
                          f"{self.HOST}; PG needs fp32, fp16 or bf16 weights")
        found = not_dense(kmodel.diffusion_model)
        if found is not None:
            raise PGError(f"a quantized UNet ({found[1]} weights, e.g. {found[0]}: mixed precision, int8 or another "
                          f"quantization) is not supported by PG on {self.HOST}; PG needs fp32, fp16 or bf16 weights")
        self.check_unet_swaps(engine)

    def check_unet_swaps(self, engine):
        """What replaces the UNet module PG routes: the torch.compile script (it wraps the KModel's
        apply_model to compile the UNet on each call, swapping `diffusion_model`)."""
        kmodel = engine.forge_objects.unet.model
        if COMPILE_WRAPPED in vars(kmodel) or hasattr(kmodel.diffusion_model, "_orig_mod"):
            raise PGError(f"a UNet compiled with torch.compile (the 'Torch Compile' script) is not supported by PG on "
                          f"{self.HOST}: set its preset to Disable")

    def _check_request(self, p, settings):
        result = super()._check_request(p, settings)
        refiner = getattr(p, "refiner_checkpoint_info", None)
        active = getattr(shared.sd_model, "sd_checkpoint_info", None)
        if refiner is not None and refiner != active and getattr(shared.opts, "refiner_fast_sd", False):
            raise PGError(f"{self.HOST}'s fast refiner swap (Settings: refiner_fast_sd) loads the refiner's weights into "
                          "the same UNet during sampling, which PG cannot follow; turn it off (the refiner's steps then "
                          "run as plain CFG) or remove the refiner")
        return result

    def _sample(self, p, settings, base_info, passes_without_pg, original_sample, args, kwargs):
        # Scripts' process_batch (the torch.compile script's) runs after PG's process(), before p.sample.
        self.check_unet_swaps(shared.sd_model)
        return super()._sample(p, settings, base_info, passes_without_pg, original_sample, args, kwargs)

    # -- LoRAs ---------------------------------------------------------------
    def lora_patchers(self, engine, stripped_files):
        """Neo's `patches` lists carry no LoRA identity (backend/patcher/base.py add_patches): a
        key's entries are the original patcher's own, then those each LoRA of `current_lora_hash`
        added in load order (networks.py load_networks, restarting from forge_objects_original).
        How many each LoRA added is found by replaying Neo's own load_lora_for_models over the
        original patchers (clones: nothing live changes); a count that does not add up stops the
        generation rather than guess."""
        from backend import memory_management, utils
        from backend.float import stochastic_rounding
        from backend.patcher.lora import merge_lora_to_weight, string_to_seed

        objects, originals = engine.forge_objects, engine.forge_objects_original
        unet, clip = objects.unet, objects.clip.patcher
        targets = lora_targets(engine)
        if any(online for *_rest, online in targets) or unet.has_online_lora() or clip.has_online_lora():
            raise PGError(f"LoRAs applied online (Neo's online LoRA option: each layer merges them in its forward) "
                          f"are not supported by PG on {self.HOST}")
        counted = self._count_lora_entries(originals, targets)

        def merger(patcher):
            def merge(entries, weight, key):
                # as ModelPatcher.patch_weight_to_device: a copy on the load device in Neo's LoRA compute
                # dtype, merge_lora_to_weight (in place on that copy), stochastic rounding to the weight's dtype
                device = patcher.load_device
                work = memory_management.cast_to_device(weight, device, memory_management.lora_compute_dtype(device), copy=True)
                merged = merge_lora_to_weight(entries, work, key)
                return stochastic_rounding(merged, weight.dtype, seed=string_to_seed(key)).to(weight.device)

            return merge

        found = []
        for index, (patcher, original_patcher) in enumerate(((unet, originals.unet), (clip, originals.clip.patcher))):
            live, reference = split_patches_by_lora(patcher.patches, original_patcher.patches, counted, index,
                                                    stripped_files, self.HOST)
            backup = patcher.backup

            def original(key, backup=backup, model=patcher.model):
                saved = backup.get(key)
                return saved.weight if saved is not None else utils.get_attr(model, key)

            found.append(PatcherLoras(patcher.model, live, reference, original, merger(patcher), frozenset(backup)))
        return found

    def _count_lora_entries(self, originals, targets):
        """[(file, ({UNet key: entries it adds}, {text-encoder key: entries it adds}))] per LoRA, from
        Neo's own loader run again on clones of the original patchers."""
        networks = sys.modules.get("networks")  # extensions-builtin/sd_forge_lora/networks.py
        if targets and (networks is None or not hasattr(networks, "load_lora_for_models")):
            raise PGError(f"{self.HOST}'s LoRA extension (sd_forge_lora) is not loaded: PG cannot tell the prompt's LoRAs apart")
        from backend.state_dict import state_dict_prefix_replace

        unet, clip = originals.unet, originals.clip
        counted = []
        with quiet(LORA_LOGGER):
            for filename, strength_unet, strength_text, online in targets:
                lora = networks.load_lora_state_dict(filename)
                if any(key.startswith("lora_unet__") for key in lora):  # as load_networks does
                    lora = state_dict_prefix_replace(lora, {"lora_unet__": "lora_unet_"})
                before = ({k: len(v) for k, v in unet.patches.items()}, {k: len(v) for k, v in clip.patcher.patches.items()})
                unet, clip = networks.load_lora_for_models(unet, clip, lora, strength_unet, strength_text,
                                                           filename=filename, online_mode=online)
                counts = tuple({key: len(entries) - was.get(key, 0) for key, entries in patcher.patches.items()
                                if len(entries) != was.get(key, 0)}
                               for patcher, was in ((unet, before[0]), (clip.patcher, before[1])))
                counted.append((filename, counts))
        return counted

    def lora_signature(self, engine):
        objects = engine.forge_objects
        return (getattr(engine, "current_lora_hash", None), objects.unet.patches_uuid, objects.clip.patcher.patches_uuid)

    def check_routed_modules(self, layers):
        """In low VRAM (or a layer Neo streams), Neo leaves a layer's LoRA to its `weight_function`
        (backend/patcher/base.py load, LowVramPatch), applied in the forward to whatever weight the
        layer holds: it would be applied again on top of the weak weight."""
        for layer in layers:
            functions = layer.module.__dict__
            if functions.get("weight_function") or functions.get("bias_function"):
                raise PGError(f"{self.HOST} loaded the UNet in low-VRAM mode, applying the LoRAs (or weight wrappers) in each "
                              "layer's forward: PG does not support that; free GPU memory (or use a base checkpoint without LoRAs)")

    # -- the engine (the rest is Forge's: lib_pg.hosts.common.forge_engine) ---------
    def load_text_encoder(self, engine):
        from backend import memory_management

        memory_management.load_model_gpu(engine.forge_objects.clip.patcher)



CONTROLLER = NeoController()
