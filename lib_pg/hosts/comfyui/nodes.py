"""The ComfyUI nodes (v1 node definitions, read by ComfyUI's nodes.load_custom_node).

- Personalization Guidance (MODEL -> MODEL): a clone of the model whose sampling
  computes CFG's unconditional branch with the weak model θ_ref + ω·(θ − θ_ref)
  inside the same UNet call. The reference is a MODEL input (the same model
  before its LoRA loader: the LoRAs to strip; or a base checkpoint loaded in the
  workflow, with the LoRAs to keep) or a base checkpoint picked from the list.
- Personalization Guidance Text Encode (negative): CLIPTextEncode for the
  negative prompt that also carries the reference CLIP, so that the weak branch
  reads the negative encoded by the weak text encoder.

Errors are PGError (an Exception): ComfyUI shows its message on the node that
raised it (this node, or the sampler for what is found while sampling).
"""

from lib_pg.errors import PGError
from lib_pg.settings import from_mapping

from lib_pg.hosts.comfyui import files
from lib_pg.hosts.comfyui.guidance import BaseCheckpoint, GuidedModel, ReferenceModel, check_model_family, log
from lib_pg.hosts.comfyui.text import WEAK_TEXT_KEY, WeakText

import folder_paths

CATEGORY = "sampling/personalization guidance"
NO_BASE = "None"
AUTOMATIC = "Automatic"  # as webui's: the listed checkpoint nearest the model in weight space


class PersonalizationGuidance:
    DESCRIPTION = ("Personalization guidance (Park et al., ICCV 2025): CFG's unconditional branch is computed with a weak model, "
                   "your model interpolated toward the reference it was trained from (ω = 0: the reference, ω = 1: plain CFG), "
                   "inside the same UNet call. Use the output MODEL in KSampler / KSamplerAdvanced / SamplerCustom (CFGGuider); "
                   "the sampler's CFG stays the guidance scale.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with personalization guidance: sample it with a CFG above 1.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's name)
        fraction = {"min": 0.0, "max": 1.0, "step": 0.01}
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "Your personalized model (a DreamBooth checkpoint, or a model with your subject LoRA)."}),
                "omega": ("FLOAT", {"default": 0.5, **fraction, "tooltip":
                                    "Weak model strength ω: 0 = the reference's weights in the unconditional branch (strongest pull "
                                    "toward your subject), 1 = plain CFG."}),
                "base_checkpoint": ([NO_BASE, AUTOMATIC] + folder_paths.get_filename_list("checkpoints"), {"tooltip":
                                    "The checkpoint your model was trained from (same architecture). Automatic: the checkpoint "
                                    "in the list nearest your model's weights (a sample of its UNet tensors; refused when none is "
                                    "plausibly its base). Leave None when you connect reference_model instead."}),
                "schedule": (["constant", "linear", "cosine"], {"default": "constant", "tooltip":
                             "Constant ω, or ω moving from omega to omega_end over the active steps."}),
                "omega_end": ("FLOAT", {"default": 0.5, **fraction, "tooltip": "ω at the end of a linear or cosine schedule."}),
                "start": ("FLOAT", {"default": 0.0, **fraction, "tooltip": "Fraction of the steps where PG starts (before: plain CFG)."}),
                "end": ("FLOAT", {"default": 1.0, **fraction, "tooltip": "Fraction of the steps where PG stops (after: plain CFG)."}),
                "weights": (["auto", "exact", "lean"], {"default": "auto", "tooltip":
                            "How the weak weights are held: exact copies of every UNet weight that differs, or lean low-rank "
                            "factors of the difference within lean_budget_mb (factored once, cached in models/"
                            "PersonalizationGuidance in webui's format). auto: exact where they fit the GPU's free memory "
                            "(always on a CPU), else lean. Lean needs a base_checkpoint from the list and your model's own "
                            "file in the checkpoints folder, without LoRAs."}),
            },
            "optional": {
                "lean_budget_mb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1048576.0, "step": 1.0, "tooltip":
                                   "Memory budget of lean weights in MiB (0: 8 % of the exact copy). A budget that holds the "
                                   "exact copy gets it."}),
                "reference_model": ("MODEL", {"tooltip":
                                    "The reference as a model: the same model before its LoRA loader (the LoRAs to strip: the weak "
                                    "branch has them at ω × their strength), or a base checkpoint's model with the LoRAs to keep."}),
            },
        }

    def apply(self, model, omega, base_checkpoint, schedule, omega_end, start, end, weights, reference_model=None,
              lean_budget_mb=0.0):
        settings = from_mapping({"enabled": True, "omega": omega, "base": "" if base_checkpoint == NO_BASE else base_checkpoint,
                                 "schedule": schedule, "omega_end": omega_end, "start": start, "end": end, "weights": weights,
                                 "lean_budget_mb": lean_budget_mb})
        check_model_family(model)
        if reference_model is not None and settings.base:
            raise PGError("connect reference_model or pick a base_checkpoint, not both (for a base with LoRAs to keep, load "
                          "the base and its LoRAs in the workflow and connect that model)")
        if reference_model is not None:
            check_model_family(reference_model)
            reference = ReferenceModel(reference_model)
        elif settings.base == AUTOMATIC:
            name, path, distance = files.automatic_base(model)
            log(f"automatic base: {name} (relative distance {distance:.3f})")
            reference = BaseCheckpoint(name, path, automatic_distance=distance)
        elif settings.base:
            reference = BaseCheckpoint(settings.base, folder_paths.get_full_path_or_raise("checkpoints", settings.base))
        else:
            raise PGError("pick a base_checkpoint (the checkpoint your model was trained from) or connect reference_model "
                          "(e.g. the model before your subject LoRA's loader)")
        guided = model.clone()
        GuidedModel(settings, reference).install(guided)
        return (guided,)


class PersonalizationGuidanceTextEncode:
    DESCRIPTION = ("Encodes the negative prompt like CLIP Text Encode with your model's CLIP, and lets Personalization Guidance "
                   "encode it for the weak branch with the reference's text encoder (interpolated at ω): needed when the text "
                   "encoder was fine-tuned or your LoRA has text-encoder layers. Connect it to the sampler's negative.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The negative conditioning (as CLIP Text Encode's), carrying the weak text encoder for PG.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {
            "required": {
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "The negative prompt (empty: the null prompt)."}),
                "clip": ("CLIP", {"tooltip": "Your model's CLIP (after its LoRA loader): what CFG's negative uses."}),
                "reference_clip": ("CLIP", {"tooltip": "The reference's CLIP: the base checkpoint's, or the CLIP before the LoRA loader."}),
            }
        }

    def encode(self, text, clip, reference_clip):
        if clip is None or reference_clip is None:
            raise PGError("connect both clip and reference_clip")
        tokens = clip.tokenize(text)
        weak = WeakText(clip, reference_clip, tokens)
        return (clip.encode_from_tokens_scheduled(tokens, add_dict={WEAK_TEXT_KEY: weak}),)


NODE_CLASS_MAPPINGS = {
    "PersonalizationGuidance": PersonalizationGuidance,
    "PersonalizationGuidanceTextEncode": PersonalizationGuidanceTextEncode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PersonalizationGuidance": "Personalization Guidance",
    "PersonalizationGuidanceTextEncode": "Personalization Guidance Text Encode (negative)",
}
