"""The weak text encoder: the negative prompt encoded by the text encoder at θ_ω.

On webui PG computes the weak branch's negative conditioning with the weak text
encoder, so a text-encoder fine-tune (or a LoRA with text-encoder layers) is
stripped from the weak branch too. In ComfyUI the negative is encoded by a node
before sampling, so the PG text-encode node encodes it as CLIPTextEncode does
with the model's CLIP (what CFG, and the conditional rows, use) and attaches
a WeakText under WEAK_TEXT_KEY to every conditioning entry. The sampling
wrappers (lib_pg.hosts.comfyui.guidance) ask it for the encoding at each ω the
run needs, before the UNet is loaded.

At ω = 0 the weak text encoder is the reference CLIP itself. Between, it is a
clone of the reference CLIP with a "diff" patch (comfy/lora.py calculate_weight)
of ω·(θ_live − θ_ref) on every weight that differs, merged by ComfyUI's own
loader: ComfyUI's patch lists, never an edit of either CLIP.
"""

import torch

from lib_pg.errors import PGError
from lib_pg.weights import same_bits

from lib_pg.hosts.comfyui.patchers import keys_that_may_differ, module_keys, patched_weight

WEAK_TEXT_KEY = "personalization_guidance_weak_text"


class WeakText:
    """One negative prompt's weak encodings: (cross-attention, pooled) per ω, built on demand."""

    def __init__(self, clip, reference_clip, tokens):
        self.clip = clip
        self.reference_clip = reference_clip
        self.tokens = tokens
        self._encoded = {}
        self._differences = None

    def differences(self):
        """key -> θ_live − θ_ref (float32) of every text-encoder weight that differs."""
        if self._differences is None:
            live, reference = self.clip.patcher, self.reference_clip.patcher
            keys = module_keys(live, "")
            ref_keys = set(module_keys(reference, ""))
            missing = [key for key in keys if key not in ref_keys]
            if missing:
                raise PGError(f"the reference CLIP is not the same kind of text encoder as the model's CLIP (it has no "
                              f"{missing[0]}); connect the CLIP of the checkpoint your model was trained from")
            differences = {}
            with torch.no_grad():
                for key in keys_that_may_differ(live, reference, keys):
                    live_weight, ref_weight = patched_weight(live, key), patched_weight(reference, key)
                    if live_weight.shape != ref_weight.shape:
                        raise PGError(f"the reference CLIP's {key} has shape {list(ref_weight.shape)}, the model's CLIP "
                                      f"{list(live_weight.shape)}: connect the CLIP your model was trained from")
                    if not same_bits(live_weight, ref_weight.to(live_weight.dtype)):
                        differences[key] = live_weight.float() - ref_weight.float()
            self._differences = differences
        return self._differences

    def clip_at(self, omega):
        if omega == 0.0:
            return self.reference_clip
        weak = self.reference_clip.clone()
        differences = self.differences()
        if differences:
            weak.add_patches({key: ("diff", (diff,)) for key, diff in differences.items()}, omega)
        return weak

    def at(self, omega):
        """(cross-attention tensor, pooled output or None) of the negative prompt with the text encoder at ω."""
        if omega not in self._encoded:
            encoded = self.clip_at(omega).encode_from_tokens_scheduled(self.tokens)
            if len(encoded) != 1:
                raise PGError("the reference CLIP carries scheduled ComfyUI hooks; PG's weak negative needs a CLIP without hooks")
            cond, extras = encoded[0]
            self._encoded[omega] = (cond, extras.get("pooled_output"))
        return self._encoded[omega]
