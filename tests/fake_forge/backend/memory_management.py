"""backend/memory_management.py: load_models_gpu / load_model_gpu (records its calls).

Kept from the real code: loading a patcher merges its LoRAs (LoadedModel.model_load ->
self.model.refresh_loras(), :518), whether or not the model moved."""

loaded = []


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    for model in models:
        loaded.append(model)
        model.refresh_loras()


def load_model_gpu(model):
    return load_models_gpu([model])
