"""backend/patcher/clip.py CLIP (Neo 2.26 :1-30): its patcher over the JointTextEncoder; clone, add_patches."""

import torch

from backend.patcher.base import ModelPatcher


class CLIP:
    def __init__(self, model_dict={}, tokenizer_dict={}, no_init=False):
        if no_init:
            return
        self.cond_stage_model = torch.nn.ModuleDict(model_dict)  # JointTextEncoder(ModuleDict)
        self.patcher = ModelPatcher(self.cond_stage_model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))

    def clone(self):
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        return n

    def add_patches(self, *args, **kwargs):
        return self.patcher.add_patches(*args, **kwargs)
