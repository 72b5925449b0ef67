"""ldm_patched/modules/model_management.py: only load_model_gpu (records its calls)."""

loaded = []  # fake-only: the patchers loaded, in order


def load_model_gpu(model):
    loaded.append(model)
