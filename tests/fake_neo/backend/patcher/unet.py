"""backend/patcher/unet.py UnetPatcher (Neo 2.26 :12-34): clone keeps the sampling extras."""

from backend.patcher.base import ModelPatcher


class UnetPatcher(ModelPatcher):
    is_unet = True  # fake-only: which patcher memory_management.LOWVRAM applies to

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.controlnet_linked_list = None
        self.extra_preserved_memory_during_sampling = 0
        self.extra_model_patchers_during_sampling = []
        self.extra_concat_condition = None

    def clone(self):
        n = super().clone()
        n.controlnet_linked_list = self.controlnet_linked_list
        n.extra_preserved_memory_during_sampling = self.extra_preserved_memory_during_sampling
        n.extra_model_patchers_during_sampling = self.extra_model_patchers_during_sampling.copy()
        n.extra_concat_condition = self.extra_concat_condition
        return n
