"""Mirrors comfy/sampler_helpers.py @ a125cd84: prepare_model_patcher copies the patcher's wrappers into
the sampling call's model_options; prepare_sampling loads (patches) the model."""

import comfy.model_management
import comfy.patcher_extension


def convert_cond(cond):
    out = []
    for c in cond:
        temp = c[1].copy()
        temp["cross_attn"] = c[0]
        temp["model_conds"] = temp.get("model_conds", {})
        out.append(temp)
    return out


def prepare_model_patcher(model, conds, model_options):
    model_options["transformer_options"]["wrappers"] = comfy.patcher_extension.copy_nested_dicts(model.wrappers)


def prepare_sampling(model, noise_shape, conds, model_options=None):
    comfy.model_management.load_models_gpu([model])
    return model.model, conds, [model]


def cleanup_models(conds, models):
    pass
