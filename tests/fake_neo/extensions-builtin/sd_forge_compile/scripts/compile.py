"""extensions-builtin/sd_forge_compile/scripts/compile.py (Neo 2.26 :110-153): the KModel's
apply_model wrapped to compile the UNet on each call (`diffusion_model` swapped for a
torch.compile OptimizedModule for the call), the original kept as `_orig_apply_model`.
Fake: `wrap(kmodel)` stands for process_batch with a compile preset (no compilation: the UNet
is only swapped for a wrapper with an `_orig_mod`)."""

import torch

_COMPILE_CONFIG_KEY = "_torch_compile_config"
_ORIG_APPLY_KEY = "_orig_apply_model"


class _Compiled(torch.nn.Module):  # torch._dynamo's OptimizedModule keeps the module as _orig_mod
    def __init__(self, module):
        super().__init__()
        self._orig_mod = module

    def forward(self, *args, **kwargs):
        return self._orig_mod(*args, **kwargs)


def wrap(kmodel):
    setattr(kmodel, _COMPILE_CONFIG_KEY, ("dynamic",))
    setattr(kmodel, _ORIG_APPLY_KEY, kmodel.apply_model)

    def apply_model_with_compile(*args, **kwargs):
        orig_model = kmodel.diffusion_model
        kmodel.diffusion_model = _Compiled(orig_model)
        try:
            return kmodel._orig_apply_model(*args, **kwargs)
        finally:
            kmodel.diffusion_model = orig_model

    kmodel.apply_model = apply_model_with_compile
