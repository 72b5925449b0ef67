"""backend/memory_management.py: only load_model_gpu (records its calls)."""

loaded = []


def load_model_gpu(model):
    loaded.append(model)
