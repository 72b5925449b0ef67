"""Fake of webui 1.10.1 modules/sd_samplers_cfg_denoiser.py: the CFGDenoiser.

An independent implementation of CFGDenoiser.forward with the same observable
behaviour: interruption check, cond/uncond reconstruction for ``self.step``, the
x/sigma/image_cond stacking (AND prompts repeat their image's rows), the
cfg_denoiser callback (whose params' x/image_cond/sigma/text_cond/text_uncond are read
back), "Skip Early CFG" and NGMS, both padding options, the three ways of calling
``inner_model`` (one batched call; chunks of batch_size; cond chunks then a separate
uncond call when token lengths differ), the fake uncond for skipped steps,
cfg_denoised/cfg_after_cfg callbacks, combine_denoised and ``step += 1``.

Not covered: InstructPix2Pix edit models and the refiner switch (apply_refiner).
``inner_model`` is settable (tests put any callable ``(x, sigma, cond=dict) -> denoised``
there); when unset it is CompVisDenoiserLike(shared.sd_model), as
CFGDenoiserKDiffusion.inner_model builds it lazily.
"""

import torch

from modules import prompt_parser, sd_samplers_common
from modules import shared
from modules.shared import opts, state
from modules.script_callbacks import CFGDenoiserParams, cfg_denoiser_callback
from modules.script_callbacks import CFGDenoisedParams, cfg_denoised_callback
from modules.script_callbacks import AfterCFGCallbackParams, cfg_after_cfg_callback


# modules/sd_samplers_cfg_denoiser.py:catenate_conds
def catenate_conds(conds):
    if isinstance(conds[0], dict):
        return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}
    return torch.cat(conds)


# modules/sd_samplers_cfg_denoiser.py:subscript_cond
def subscript_cond(cond, a, b):
    if isinstance(cond, dict):
        return {key: value[a:b] for key, value in cond.items()}
    return cond[a:b]


# modules/sd_samplers_cfg_denoiser.py:pad_cond
def pad_cond(tensor, repeats, empty):
    if isinstance(tensor, dict):
        tensor['crossattn'] = pad_cond(tensor['crossattn'], repeats, empty)
        return tensor
    filler = empty.repeat((tensor.shape[0], repeats, 1))
    return torch.cat([tensor, filler], dim=1)


def _rows(t, repeats, tail):
    # rows of ``t`` each repeated repeats[i] times (one per AND sub-prompt), then the ``tail`` rows
    counts = torch.tensor(repeats, device=t.device)
    return torch.cat([torch.repeat_interleave(t[:len(repeats)], counts, dim=0), tail])


class CFGDenoiser(torch.nn.Module):
    # modules/sd_samplers_cfg_denoiser.py:CFGDenoiser
    def __init__(self, sampler):
        super().__init__()
        self.model_wrap = None
        self.mask = None
        self.nmask = None
        self.init_latent = None
        self.steps = None
        self.total_steps = None
        self.step = 0
        self.image_cfg_scale = None
        self.padded_cond_uncond = False
        self.padded_cond_uncond_v0 = False
        self.sampler = sampler
        self.p = None
        self.cond_scale_miltiplier = 1.0
        self.need_last_noise_uncond = False
        self.last_noise_uncond = None
        self.mask_before_denoising = False

    # modules/sd_samplers_kdiffusion.py:CFGDenoiserKDiffusion.inner_model
    @property
    def inner_model(self):
        if self.model_wrap is None and shared.sd_model is not None:
            self.model_wrap = sd_samplers_common.CompVisDenoiserLike(shared.sd_model)
        return self.model_wrap

    # fake-only setter: tests (and FakeEulerSampler) assign the model wrapper
    @inner_model.setter
    def inner_model(self, value):
        self.model_wrap = value

    # modules/sd_samplers_cfg_denoiser.py:CFGDenoiser.combine_denoised
    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        denoised_uncond = x_out[-uncond.shape[0]:]
        denoised = denoised_uncond.clone()
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised

    # modules/sd_samplers_cfg_denoiser.py:CFGDenoiser.get_pred_x0
    def get_pred_x0(self, x_in, x_out, sigma):
        return x_out

    # modules/sd_samplers_cfg_denoiser.py:CFGDenoiser.update_inner_model
    def update_inner_model(self):
        self.model_wrap = None
        c, uc = self.p.get_conds()
        self.sampler.sampler_extra_args['cond'] = c
        self.sampler.sampler_extra_args['uncond'] = uc

    # modules/sd_samplers_cfg_denoiser.py:CFGDenoiser.pad_cond_uncond
    def pad_cond_uncond(self, cond, uncond):
        empty = shared.sd_model.cond_stage_model_empty_prompt
        diff = (cond.shape[1] - uncond.shape[1]) // empty.shape[1]
        if diff > 0:
            uncond = pad_cond(uncond, diff, empty)
            self.padded_cond_uncond = True
        elif diff < 0:
            cond = pad_cond(cond, -diff, empty)
            self.padded_cond_uncond = True
        return cond, uncond

    # modules/sd_samplers_cfg_denoiser.py:CFGDenoiser.pad_cond_uncond_v0
    def pad_cond_uncond_v0(self, cond, uncond):
        is_dict = isinstance(uncond, dict)
        vec = uncond['crossattn'] if is_dict else uncond
        want = cond.shape[1]
        if vec.shape[1] < want:
            vec = torch.cat([vec, vec[:, -1:].repeat(1, want - vec.shape[1], 1)], dim=1)
            self.padded_cond_uncond_v0 = True
        elif vec.shape[1] > want:
            vec = vec[:, :want]
            self.padded_cond_uncond_v0 = True
        if is_dict:
            uncond['crossattn'] = vec
            return cond, uncond
        return cond, vec

    def _blend(self, latent, sigma):
        # the apply_blend closure of CFGDenoiser.forward (mask blending + scripts' on_mask_blend)
        blended = latent * self.nmask + self.init_latent * self.mask
        if self.p is not None and self.p.scripts is not None:
            from modules import scripts
            mba = scripts.MaskBlendArgs(latent, self.nmask, self.init_latent, self.mask, blended, denoiser=self, sigma=sigma)
            self.p.scripts.on_mask_blend(self.p, mba)
            blended = mba.blended_latent
        return blended

    # modules/sd_samplers_cfg_denoiser.py:CFGDenoiser.forward
    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if state.interrupted or state.skipped:
            raise sd_samplers_common.InterruptedException

        conds_list, tensor = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step)

        if self.mask_before_denoising and self.mask is not None:
            x = self._blend(x, sigma)

        batch_size = len(conds_list)
        repeats = [len(c) for c in conds_list]

        if shared.sd_model.model.conditioning_key == "crossattn-adm":
            image_uncond = torch.zeros_like(image_cond)

            def make_condition_dict(c_crossattn, c_adm):
                return {"c_crossattn": [c_crossattn], "c_adm": c_adm}
        else:
            image_uncond = image_cond
            dict_conds = isinstance(uncond, dict)

            def make_condition_dict(c_crossattn, c_concat):
                if dict_conds:
                    return {**c_crossattn, "c_concat": [c_concat]}
                return {"c_crossattn": [c_crossattn], "c_concat": [c_concat]}

        x_in = _rows(x, repeats, x)
        sigma_in = _rows(sigma, repeats, sigma)
        image_cond_in = _rows(image_cond, repeats, image_uncond)

        params = CFGDenoiserParams(x_in, image_cond_in, sigma_in, state.sampling_step, state.sampling_steps, tensor, uncond, self)
        cfg_denoiser_callback(params)
        x_in, image_cond_in, sigma_in = params.x, params.image_cond, params.sigma
        tensor, uncond = params.text_cond, params.text_uncond

        skip_uncond = False
        if opts.skip_early_cond != 0. and self.step / self.total_steps <= opts.skip_early_cond:
            skip_uncond = True
            self.p.extra_generation_params["Skip Early CFG"] = opts.skip_early_cond
        elif (self.step % 2 or opts.s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond:
            skip_uncond = True
            self.p.extra_generation_params["NGMS"] = s_min_uncond
            if opts.s_min_uncond_all:
                self.p.extra_generation_params["NGMS all steps"] = opts.s_min_uncond_all

        if skip_uncond:  # image_cond_in keeps its uncond rows, as in webui
            x_in, sigma_in = x_in[:-batch_size], sigma_in[:-batch_size]

        self.padded_cond_uncond = False
        self.padded_cond_uncond_v0 = False
        if opts.pad_cond_uncond_v0 and tensor.shape[1] != uncond.shape[1]:
            tensor, uncond = self.pad_cond_uncond_v0(tensor, uncond)
        elif opts.pad_cond_uncond and tensor.shape[1] != uncond.shape[1]:
            tensor, uncond = self.pad_cond_uncond(tensor, uncond)

        if skip_uncond or tensor.shape[1] == uncond.shape[1]:
            cond_in = tensor if skip_uncond else catenate_conds([tensor, uncond])
            if opts.batch_cond_uncond:
                x_out = self.inner_model(x_in, sigma_in, cond=make_condition_dict(cond_in, image_cond_in))
            else:
                x_out = torch.zeros_like(x_in)
                for a in range(0, x_out.shape[0], batch_size):
                    b = a + batch_size
                    x_out[a:b] = self.inner_model(x_in[a:b], sigma_in[a:b], cond=make_condition_dict(subscript_cond(cond_in, a, b), image_cond_in[a:b]))
        else:
            x_out = torch.zeros_like(x_in)
            chunk = batch_size * 2 if opts.batch_cond_uncond else batch_size
            n_cond = tensor.shape[0]
            for a in range(0, n_cond, chunk):
                b = min(a + chunk, n_cond)
                x_out[a:b] = self.inner_model(x_in[a:b], sigma_in[a:b], cond=make_condition_dict(subscript_cond(tensor, a, b), image_cond_in[a:b]))
            n_uncond = uncond.shape[0]
            x_out[-n_uncond:] = self.inner_model(x_in[-n_uncond:], sigma_in[-n_uncond:], cond=make_condition_dict(uncond, image_cond_in[-n_uncond:]))

        first_rows = [conds[0][0] for conds in conds_list]
        if skip_uncond:  # the first sub-prompt's result stands in for each image's uncond row
            x_out = torch.cat([x_out, x_out[first_rows]])

        denoised_params = CFGDenoisedParams(x_out, state.sampling_step, state.sampling_steps, self.inner_model)
        cfg_denoised_callback(denoised_params)

        if self.need_last_noise_uncond:
            self.last_noise_uncond = x_out[-uncond.shape[0]:].clone()

        scale = 1.0 if skip_uncond else cond_scale * self.cond_scale_miltiplier
        denoised = self.combine_denoised(x_out, conds_list, uncond, scale)

        if not self.mask_before_denoising and self.mask is not None:
            denoised = self._blend(denoised, sigma)

        self.sampler.last_latent = self.get_pred_x0(x_in[first_rows], x_out[first_rows], sigma)

        if opts.live_preview_content == "Prompt":
            preview = self.sampler.last_latent
        elif opts.live_preview_content == "Negative prompt":
            preview = self.get_pred_x0(x_in[-uncond.shape[0]:], x_out[-uncond.shape[0]:], sigma)
        else:
            preview = self.get_pred_x0(x_in[first_rows], denoised[first_rows], sigma)
        sd_samplers_common.store_latent(preview)

        after_params = AfterCFGCallbackParams(denoised, state.sampling_step, state.sampling_steps)
        cfg_after_cfg_callback(after_params)
        denoised = after_params.x

        self.step += 1
        return denoised
