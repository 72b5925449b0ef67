"""modules_forge/forge_sampler.py: the a1111 -> ldm_patched conditioning conversion."""

import torch


def cond_from_a1111_to_patched_ldm(cond):
    if isinstance(cond, torch.Tensor):
        return [dict(cross_attn=cond, model_conds=dict(c_crossattn=cond))]
    return [dict(cross_attn=cond["crossattn"], pooled_output=cond["vector"],
                 model_conds=dict(c_crossattn=cond["crossattn"], y=cond["vector"]))]


def cond_from_a1111_to_patched_ldm_weighted(cond, weights):
    transposed = list(map(list, zip(*weights)))
    results = []
    for cond_pre in transposed:
        current_indices = []
        current_weight = 0
        for i, w in cond_pre:
            current_indices.append(i)
            current_weight = w
        feed = {k: v[current_indices] for k, v in cond.items()} if isinstance(cond, dict) else cond[current_indices]
        h = cond_from_a1111_to_patched_ldm(feed)
        h[0]["strength"] = current_weight
        results += h
    return results


def sampling_prepare(unet, x):
    # modules_forge/forge_sampler.py sampling_prepare (:116-140): loads the UNet's patcher (merging its LoRA patches)
    from ldm_patched.modules import model_management

    model_management.load_models_gpu(models=[unet] + list(unet.extra_model_patchers_during_sampling),
                                     memory_required=unet.extra_preserved_memory_during_sampling)
