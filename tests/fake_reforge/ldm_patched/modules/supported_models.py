"""ldm_patched/modules/supported_models.py: the model classes' names (PG reads type(model_config).__name__)."""


class SD15:
    pass


class SDXL:
    pass


class Flux:
    pass
