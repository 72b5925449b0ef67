"""Mirrors comfy/patcher_extension.py @ a125cd84: WrappersMP, add_wrapper_with_key, get_all_wrappers,
WrapperExecutor (a chain: each wrapper receives the executor and calls it to go on)."""


class WrappersMP:
    OUTER_SAMPLE = "outer_sample"
    PREPARE_SAMPLING = "prepare_sampling"
    SAMPLER_SAMPLE = "sampler_sample"
    PREDICT_NOISE = "predict_noise"
    CALC_COND_BATCH = "calc_cond_batch"
    APPLY_MODEL = "apply_model"
    DIFFUSION_MODEL = "diffusion_model"

    @classmethod
    def init_wrappers(cls):
        return {}


def add_wrapper_with_key(wrapper_type, key, wrapper, transformer_options, is_model_options=False):
    if is_model_options:
        transformer_options = transformer_options.setdefault("transformer_options", {})
    wrappers = transformer_options.setdefault("wrappers", {})
    wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)


def get_all_wrappers(wrapper_type, transformer_options, is_model_options=False):
    if is_model_options:
        transformer_options = transformer_options.get("transformer_options", {})
    found = []
    for w in transformer_options.get("wrappers", {}).get(wrapper_type, {}).values():
        found.extend(w)
    return found


class WrapperExecutor:
    def __init__(self, original, class_obj, wrappers, idx):
        self.original = original
        self.class_obj = class_obj
        self.wrappers = wrappers.copy()
        self.idx = idx
        self.is_last = idx == len(wrappers)

    def __call__(self, *args, **kwargs):
        return self._create_next_executor().execute(*args, **kwargs)

    def execute(self, *args, **kwargs):
        args, kwargs = list(args), dict(kwargs)
        if self.is_last:
            return self.original(*args, **kwargs)
        return self.wrappers[self.idx](self, *args, **kwargs)

    def _create_next_executor(self):
        if self.class_obj is None:
            return WrapperExecutor.new_executor(self.original, self.wrappers, self.idx + 1)
        return WrapperExecutor.new_class_executor(self.original, self.class_obj, self.wrappers, self.idx + 1)

    @classmethod
    def new_executor(cls, original, wrappers, idx=0):
        return cls(original, class_obj=None, wrappers=wrappers, idx=idx)

    @classmethod
    def new_class_executor(cls, original, class_obj, wrappers, idx=0):
        return cls(original, class_obj, wrappers, idx=idx)


def copy_nested_dicts(input_dict):
    new_dict = input_dict.copy()
    for key, value in input_dict.items():
        if isinstance(value, dict):
            new_dict[key] = copy_nested_dicts(value)
        elif isinstance(value, list):
            new_dict[key] = value.copy()
    return new_dict
