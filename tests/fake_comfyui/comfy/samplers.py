"""Mirrors comfy/samplers.py @ a125cd84 where PG depends on it: CFGGuider.sample -> OUTER_SAMPLE wrappers
-> outer_sample (prepare_sampling loads the model) -> inner_sample (process_conds, `sample_sigmas` in
transformer_options, SAMPLER_SAMPLE wrappers) -> the sampler -> outer_predict_noise (PREDICT_NOISE
wrappers) -> predict_noise -> sampling_function (conds = [cond, uncond], uncond None at CFG 1) ->
calc_cond_batch (CALC_COND_BATCH wrappers) -> _calc_cond_batch: entries that can be concatenated run in
one call, in reversed order, each chunk tagged in transformer_options["cond_or_uncond"] with its index
into conds. Areas, masks, hooks, ControlNet, memory-based splitting are left out; the sampler is Euler."""

import math

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.sampler_helpers


def _concat_ok(c1, c2):
    return c1.keys() == c2.keys() and all(c1[k].can_concat(c2[k]) for k in c1)


def calc_cond_batch(model, conds, x_in, timestep, model_options):
    executor = comfy.patcher_extension.WrapperExecutor.new_executor(
        _calc_cond_batch,
        comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, model_options, is_model_options=True))
    return executor.execute(model, conds, x_in, timestep, model_options)


def _calc_cond_batch(model, conds, x_in, timestep, model_options):
    out_conds = [torch.zeros_like(x_in) for _ in conds]
    out_counts = [torch.ones_like(x_in) * 1e-37 for _ in conds]
    to_run = []
    for i, cond in enumerate(conds):
        for x in cond or ():
            to_run.append(({k: v.process_cond(batch_size=x_in.shape[0]) for k, v in x["model_conds"].items()}, i))
    while to_run:
        first = to_run[0]
        to_batch = [j for j in range(len(to_run)) if _concat_ok(to_run[j][0], first[0])]
        to_batch.reverse()
        batch_limit = model_options.get("fake_max_chunks_per_call")  # stands in for the free-memory split
        if batch_limit:
            to_batch = to_batch[:batch_limit]
        chunks = [to_run.pop(j) for j in to_batch]
        cond_or_uncond = [index for _c, index in chunks]
        c = {k: chunks[0][0][k].concat([ch[0][k] for ch in chunks[1:]]) for k in chunks[0][0]}
        input_x = torch.cat([x_in] * len(chunks))
        timestep_ = torch.cat([timestep] * len(chunks))
        transformer_options = comfy.patcher_extension.copy_nested_dicts(model_options.get("transformer_options", {}))
        transformer_options["cond_or_uncond"] = cond_or_uncond[:]
        transformer_options["sigmas"] = timestep
        c["transformer_options"] = transformer_options
        output = model.apply_model(input_x, timestep_, **c).chunk(len(chunks))
        for o, index in enumerate(cond_or_uncond):
            out_conds[index] += output[o]
            out_counts[index] += 1.0
    return [o / n for o, n in zip(out_conds, out_counts)]


def cfg_function(model, cond_pred, uncond_pred, cond_scale, x, timestep, model_options={}, cond=None, uncond=None):
    return uncond_pred + (cond_pred - uncond_pred) * cond_scale


def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None):
    uncond_ = None if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False) else uncond
    conds = [cond, uncond_]
    out = calc_cond_batch(model, conds, x, timestep, model_options)
    return cfg_function(model, out[0], out[1], cond_scale, x, timestep, model_options=model_options, cond=cond, uncond=uncond_)


def encode_model_conds(model_function, conds, noise, device, prompt_type, **kwargs):
    for t in range(len(conds)):
        x = conds[t]
        params = x.copy()
        params.update(device=device, noise=noise, prompt_type=params.get("prompt_type", prompt_type))
        params["width"] = params.get("width", noise.shape[3] * 8 if len(noise.shape) >= 4 else None)
        params["height"] = params.get("height", noise.shape[2] * 8)
        for k in kwargs:
            if k not in params:
                params[k] = kwargs[k]
        out = model_function(**params)
        x = x.copy()
        model_conds = x["model_conds"].copy()
        model_conds.update(out)
        x["model_conds"] = model_conds
        conds[t] = x
    return conds


def process_conds(model, noise, conds, device, latent_image=None, denoise_mask=None, seed=None):
    for k in conds:
        conds[k] = encode_model_conds(model.extra_conds, conds[k][:], noise, device, k,
                                      latent_image=latent_image, denoise_mask=denoise_mask, seed=seed)
    return conds


class KSAMPLER:
    """Euler (k-diffusion sample_euler), calling the guider once per step."""

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        x = noise * sigmas[0] + (latent_image if latent_image is not None else 0)
        for i in range(len(sigmas) - 1):
            s = sigmas[i] * x.new_ones([x.shape[0]])
            denoised = model_wrap(x, s, model_options=extra_args["model_options"], seed=extra_args.get("seed"))
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
            if callback is not None:
                callback(i, denoised, x, len(sigmas) - 1)
        return x


class CFGGuider:
    def __init__(self, model_patcher):
        self.model_patcher = model_patcher
        self.model_options = model_patcher.model_options
        self.original_conds = {}
        self.cfg = 1.0

    def set_conds(self, positive, negative):
        self.inner_set_conds({"positive": positive, "negative": negative})

    def set_cfg(self, cfg):
        self.cfg = cfg

    def inner_set_conds(self, conds):
        for k in conds:
            self.original_conds[k] = comfy.sampler_helpers.convert_cond(conds[k])

    def __call__(self, *args, **kwargs):
        return self.outer_predict_noise(*args, **kwargs)

    def outer_predict_noise(self, x, timestep, model_options={}, seed=None):
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(
            self.predict_noise, self,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.PREDICT_NOISE, self.model_options, is_model_options=True),
        ).execute(x, timestep, model_options, seed)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        return sampling_function(self.inner_model, x, timestep, self.conds.get("negative", None), self.conds.get("positive", None),
                                 self.cfg, model_options=model_options, seed=seed)

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar, seed):
        self.conds = process_conds(self.inner_model, noise, self.conds, device, latent_image, denoise_mask, seed)
        extra_model_options = comfy.patcher_extension.copy_nested_dicts(self.model_options)
        extra_model_options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
        extra_args = {"model_options": extra_model_options, "seed": seed}
        executor = comfy.patcher_extension.WrapperExecutor.new_class_executor(
            sampler.sample, sampler,
            comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, extra_args["model_options"], is_model_options=True))
        return executor.execute(self, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)

    def outer_sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False, seed=None):
        self.inner_model, self.conds, self.loaded_models = comfy.sampler_helpers.prepare_sampling(self.model_patcher, noise.shape, self.conds, self.model_options)
        try:
            self.model_patcher.pre_run()
            output = self.inner_sample(noise, latent_image, torch.device("cpu"), sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
        finally:
            self.model_patcher.cleanup()
        del self.inner_model
        return output

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False, seed=None):
        self.conds = {k: [a.copy() for a in v] for k, v in self.original_conds.items()}
        orig_model_options = self.model_options
        try:
            self.model_options = comfy.patcher_extension.copy_nested_dicts(self.model_options)
            comfy.sampler_helpers.prepare_model_patcher(self.model_patcher, self.conds, self.model_options)
            executor = comfy.patcher_extension.WrapperExecutor.new_class_executor(
                self.outer_sample, self,
                comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, self.model_options, is_model_options=True))
            output = executor.execute(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
        finally:
            self.model_options = orig_model_options
        del self.conds
        return output


def sample(model, noise, positive, negative, cfg, device, sampler, sigmas, model_options={}, latent_image=None, denoise_mask=None,
           callback=None, disable_pbar=False, seed=None):
    cfg_guider = CFGGuider(model)
    cfg_guider.set_conds(positive, negative)
    cfg_guider.set_cfg(cfg)
    return cfg_guider.sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)
