"""ldm_patched/modules/samplers.py: sampling_function and calc_cond_batch, as far as PG relies on them.

Kept from the real code: the cfg-1 optimisation (no unconditional entry when
cond_scale is 1), each conditioning entry a chunk of exactly x_in.shape[0]
rows, the batching order (`to_batch_temp.reverse()`: the unconditional chunk
first), the halving of a batch when memory is short (fake switch
`MEMORY_CHUNKS`), `transformer_options["cond_or_uncond"]` (no uncond_indices),
the optional `model_options["model_function_wrapper"]`, and the
lcm-repeat of cross-attention of different lengths (conds.py CONDCrossAttn.concat).
"""

import math

import torch

MEMORY_CHUNKS = None  # fake-only: at most this many chunks per call (None: all fit)


def _lcm(a, b):
    return abs(a * b) // math.gcd(a, b)


def _cross_attn_cat(tensors):
    # conds.py CONDCrossAttn.concat: repeat each to the lcm of the token lengths
    length = 1
    for t in tensors:
        length = _lcm(length, t.shape[1])
    return torch.cat([t.repeat(1, length // t.shape[1], 1) for t in tensors])


def _can_concat(a, b):
    # samplers.py can_concat_cond / conds.py CONDCrossAttn.can_concat (lcm factor <= 4)
    if a["input_x"].shape != b["input_x"].shape:
        return False
    la, lb = a["c_crossattn"].shape[1], b["c_crossattn"].shape[1]
    return _lcm(la, lb) // min(la, lb) <= 4 and ("y" in a) == ("y" in b)


def calc_cond_batch(model, conds, x_in, timestep, model_options):
    out_conds, out_counts, to_run = [], [], []
    for i, cond in enumerate(conds):
        out_conds.append(torch.zeros_like(x_in))
        out_counts.append(torch.ones_like(x_in) * 1e-37)
        if cond is None:
            continue
        for entry in cond:
            model_conds = entry["model_conds"]
            p = {"input_x": x_in, "mult": entry.get("strength", 1.0), "c_crossattn": model_conds["c_crossattn"]}
            if "y" in model_conds:
                p["y"] = model_conds["y"]
            if "c_concat" in model_conds:
                p["c_concat"] = model_conds["c_concat"]
            to_run.append((p, i))
    while to_run:
        first = to_run[0]
        to_batch_temp = [x for x in range(len(to_run)) if _can_concat(to_run[x][0], first[0])]
        to_batch_temp.reverse()
        to_batch = to_batch_temp[:MEMORY_CHUNKS] if MEMORY_CHUNKS else to_batch_temp
        input_x, mult, crossattn, ys, concats, cond_or_uncond = [], [], [], [], [], []
        for x in to_batch:
            p, index = to_run.pop(x)
            input_x.append(p["input_x"])
            mult.append(p["mult"])
            crossattn.append(p["c_crossattn"])
            if "y" in p:
                ys.append(p["y"])
            if "c_concat" in p:
                concats.append(p["c_concat"])
            cond_or_uncond.append(index)
        batch_chunks = len(cond_or_uncond)
        c = {"c_crossattn": _cross_attn_cat(crossattn)}
        if ys:
            c["y"] = torch.cat(ys)
        if concats:
            c["c_concat"] = torch.cat(concats)
        transformer_options = dict(model_options.get("transformer_options", {}))
        transformer_options["cond_or_uncond"] = cond_or_uncond[:]
        transformer_options["sigmas"] = timestep
        c["transformer_options"] = transformer_options
        input_x = torch.cat(input_x)
        timestep_ = torch.cat([timestep] * batch_chunks)
        if "model_function_wrapper" in model_options:
            output = model_options["model_function_wrapper"](model.apply_model, {"input": input_x, "timestep": timestep_, "c": c,
                                                                                 "cond_or_uncond": cond_or_uncond}).chunk(batch_chunks)
        else:
            output = model.apply_model(input_x, timestep_, **c).chunk(batch_chunks)
        for o in range(batch_chunks):
            out_conds[cond_or_uncond[o]] += output[o] * mult[o]
            out_counts[cond_or_uncond[o]] += mult[o]
    for i in range(len(out_conds)):
        out_conds[i] /= out_counts[i]
    return out_conds


def cfg_function(model, cond_pred, uncond_pred, cond_scale, x, timestep, model_options={}, cond=None, uncond=None):
    if uncond_pred is None:
        return cond_pred
    return uncond_pred + (cond_pred - uncond_pred) * cond_scale


def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None):
    if math.isclose(cond_scale, 1.0) and model_options.get("disable_cfg1_optimization", False) == False:  # noqa: E712
        uncond_ = None
    else:
        uncond_ = uncond
    conds = [cond, uncond_]
    out = calc_cond_batch(model, conds, x, timestep, model_options)
    return cfg_function(model, out[0], out[1], cond_scale, x, timestep, model_options=model_options, cond=cond, uncond=uncond_)
