"""modules_forge/unet_patcher.py: UnetPatcher (clone keeps the patch lists, patches_uuid and the shared backup)."""

from ldm_patched.modules.model_patcher import ModelPatcher


class UnetPatcher(ModelPatcher):
    is_unet = True  # fake-only: which patcher model_management.LOWVRAM applies to

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.controlnet_linked_list = None
        self.extra_preserved_memory_during_sampling = 0
        self.extra_model_patchers_during_sampling = []
        self.extra_concat_condition = None
        self.compiled = False

    def clone(self):
        n = UnetPatcher(self.model, self.load_device, self.offload_device, self.size)
        n.patches = {k: self.patches[k][:] for k in self.patches}
        n.object_patches = self.object_patches.copy()
        n.model_options = {**self.model_options, "transformer_options": dict(self.model_options["transformer_options"])}
        n.controlnet_linked_list = self.controlnet_linked_list
        n.extra_preserved_memory_during_sampling = self.extra_preserved_memory_during_sampling
        n.extra_model_patchers_during_sampling = self.extra_model_patchers_during_sampling.copy()
        n.extra_concat_condition = self.extra_concat_condition
        n.patches_uuid = self.patches_uuid
        n.backup = self.backup
        n.compiled = self.compiled
        n.parent = self
        return n
