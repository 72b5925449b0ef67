"""backend/sampling/sampling_function.py (Neo 2.26, :156-290, :365-389): calc_cond_uncond_batch and the CFG around it.

The same as Forge's for SD 1.x and SDXL (the PixelDiT context_handler aside). Kept from the real code: COND = 0 / UNCOND = 1 tags, every cond entry first then the uncond entry,
`to_batch_temp.reverse()` (uncond chunk first), each entry a chunk of x_in.shape[0] rows,
`transformer_options` with cond_or_uncond, cond_indices, uncond_indices, the optional
model_function_wrapper, and `uncond_ = None` when cond_scale is 1 (no unconditional pass);
sampling_prepare loading the UNet's patcher (which merges its LoRA patches, or leaves them to the
layers' weight_function in low VRAM / online mode).
"""

import math

import torch

COND = 0
UNCOND = 1
MEMORY_CHUNKS = None  # fake-only: at most this many chunks per call


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    out_cond = torch.zeros_like(x_in)
    out_count = torch.ones_like(x_in) * 1e-37
    out_uncond = torch.zeros_like(x_in)
    out_uncond_count = torch.ones_like(x_in) * 1e-37
    to_run = []
    for entry in cond:
        to_run.append(({"input_x": x_in, "mult": entry.get("strength", 1.0), "c": entry["model_conds"]}, COND))
    if uncond is not None:
        for entry in uncond:
            to_run.append(({"input_x": x_in, "mult": 1.0, "c": entry["model_conds"]}, UNCOND))
    while to_run:
        first = to_run[0]
        to_batch_temp = [x for x in range(len(to_run))
                         if to_run[x][0]["c"]["c_crossattn"].shape[1] == first[0]["c"]["c_crossattn"].shape[1]]
        to_batch_temp.reverse()
        to_batch = to_batch_temp[:MEMORY_CHUNKS] if MEMORY_CHUNKS else to_batch_temp
        input_x, mult, crossattn, ys, cond_or_uncond = [], [], [], [], []
        for x in to_batch:
            p, tag = to_run.pop(x)
            input_x.append(p["input_x"])
            mult.append(p["mult"])
            crossattn.append(p["c"]["c_crossattn"])
            if "y" in p["c"]:
                ys.append(p["c"]["y"])  # backend/sampling/condition.py Condition.concat: SDXL's pooled vector
            cond_or_uncond.append(tag)
        batch_chunks = len(cond_or_uncond)
        input_x = torch.cat(input_x)
        c = {"c_crossattn": torch.cat(crossattn)}
        if ys:
            c["y"] = torch.cat(ys)
        transformer_options = dict(model_options.get("transformer_options", {}))
        cl = x_in.shape[0]
        transformer_options["cond_or_uncond"] = cond_or_uncond[:]
        transformer_options["cond_indices"] = [i for i, t in enumerate(cond_or_uncond) for _ in range(cl) if t == COND]
        transformer_options["uncond_indices"] = [j * cl + i for j, t in enumerate(cond_or_uncond) if t == UNCOND for i in range(cl)]
        transformer_options["sigmas"] = timestep
        c["transformer_options"] = transformer_options
        timestep_ = torch.cat([timestep] * batch_chunks)
        if "model_function_wrapper" in model_options:
            output = model_options["model_function_wrapper"](model.apply_model, {"input": input_x, "timestep": timestep_, "c": c,
                                                                                 "cond_or_uncond": cond_or_uncond}).chunk(batch_chunks)
        else:
            output = model.apply_model(input_x, timestep_, **c).chunk(batch_chunks)
        for o in range(batch_chunks):
            if cond_or_uncond[o] == COND:
                out_cond += output[o] * mult[o]
                out_count += mult[o]
            else:
                out_uncond += output[o] * mult[o]
                out_uncond_count += mult[o]
    return out_cond / out_count, out_uncond / out_uncond_count


def sampling_prepare(unet, x):
    from backend import memory_management

    memory_management.load_models_gpu(models=[unet] + list(unet.extra_model_patchers_during_sampling), memory_required=0,
                                      minimum_memory_required=0)


def sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None):
    if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False):
        uncond_ = None
    else:
        uncond_ = uncond
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options)
    if uncond_ is None:
        return cond_pred
    return uncond_pred + (cond_pred - uncond_pred) * cond_scale
