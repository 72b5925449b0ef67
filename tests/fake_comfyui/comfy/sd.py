"""Mirrors comfy/sd.py @ a125cd84 CLIP (a ModelPatcher over the text encoder; encoding loads it, patches
merged) and load_checkpoint_guess_config's return shape. The fake's checkpoints are registered in
CHECKPOINTS (path -> a function building (model patcher, clip, vae, clipvision)): the real one guesses the
model config from the file's state dict."""

import comfy.model_management
import comfy.model_patcher

CHECKPOINTS = {}


class CLIP:
    def __init__(self, target=None, no_init=False, tokenizer=None):
        if no_init:
            return
        self.cond_stage_model = target
        self.tokenizer = tokenizer
        self.patcher = comfy.model_patcher.ModelPatcher(self.cond_stage_model, load_device="cpu", offload_device="cpu")
        self.layer_idx = None

    def clone(self):
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        n.tokenizer = self.tokenizer
        n.layer_idx = self.layer_idx
        return n

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        return self.patcher.add_patches(patches, strength_patch, strength_model)

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return self.tokenizer(text)

    def load_model(self):
        comfy.model_management.load_models_gpu([self.patcher])
        return self.patcher

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        self.load_model()
        out = self.cond_stage_model(tokens)
        cond, pooled = out if isinstance(out, tuple) else (out, None)  # SDXL's text encoders pool too
        if return_dict:
            return {"cond": cond, "pooled_output": pooled}
        return (cond, pooled) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens, unprojected=False, add_dict={}, show_pbar=True):
        pooled_dict = self.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        cond = pooled_dict.pop("cond")
        pooled_dict.update(add_dict)
        return [[cond, pooled_dict]]


def load_checkpoint_guess_config(ckpt_path, output_vae=True, output_clip=True, output_clipvision=False, embedding_directory=None,
                                 output_model=True, model_options={}, te_model_options={}):
    return CHECKPOINTS[ckpt_path]()
