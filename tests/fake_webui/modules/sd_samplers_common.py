"""Fake of webui 1.10.1 modules/sd_samplers_common.py (with the k-diffusion pieces webui
uses from it: the CompVis eps-denoiser wrapper and the Euler/Euler a/DPM2 sampling loops).

``FakeEulerSampler`` stands in for sd_samplers_kdiffusion.py:KDiffusionSampler (built on
Sampler here): it owns a CFGDenoiser (``model_wrap_cfg``) whose ``inner_model`` is a
``CompVisDenoiserLike(sd_model)``, runs k-diffusion style steps calling the denoiser
with webui's extra_args, and like Sampler.launch_sampling returns the last latent when
InterruptedException is raised.
"""

from __future__ import annotations

from collections import namedtuple

import torch

from modules import shared
from modules.shared import opts, state

SamplerDataTuple = namedtuple('SamplerData', ['name', 'constructor', 'aliases', 'options'])  # modules/sd_samplers_common.py:SamplerDataTuple


class SamplerData(SamplerDataTuple):
    # modules/sd_samplers_common.py:SamplerData
    def total_steps(self, steps):
        return steps * 2 if self.options.get("second_order", False) else steps


class InterruptedException(BaseException):
    # modules/sd_samplers_common.py:InterruptedException
    pass


# modules/sd_samplers_common.py:setup_img2img_steps
def setup_img2img_steps(p, steps=None):
    if opts.img2img_fix_steps or steps is not None:
        requested = steps or p.steps
        steps = int(requested / min(p.denoising_strength, 0.999)) if p.denoising_strength > 0 else 0
        return steps, requested - 1
    return p.steps, int(min(p.denoising_strength, 0.999) * p.steps)


# modules/sd_samplers_common.py:store_latent
def store_latent(decoded):
    state.current_latent = decoded


# modules/sd_samplers_common.py:is_sampler_using_eta_noise_seed_delta
def is_sampler_using_eta_noise_seed_delta(p):
    return False


def _default_alphas_cumprod():
    # the SD1/SD2/SDXL DDPM schedule: scaled-linear betas 0.00085..0.012 over 1000 steps
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class CompVisDenoiserLike:
    # k_diffusion/external.py:CompVisDenoiser (what CFGDenoiserKDiffusion.inner_model wraps around shared.sd_model)
    def __init__(self, model, quantize=False):
        self.inner_model = model
        alphas_cumprod = getattr(model, "alphas_cumprod", None)
        if not isinstance(alphas_cumprod, torch.Tensor):
            alphas_cumprod = _default_alphas_cumprod()
        ac = alphas_cumprod.detach().to("cpu", torch.float64)
        self.sigmas = ((1 - ac) / ac).sqrt().float()
        self.log_sigmas = self.sigmas.log()
        self.quantize = quantize

    # k_diffusion/external.py:DiscreteSchedule.sigma_min
    @property
    def sigma_min(self):
        return self.sigmas[0]

    # k_diffusion/external.py:DiscreteSchedule.sigma_max
    @property
    def sigma_max(self):
        return self.sigmas[-1]

    # k_diffusion/external.py:DiscreteSchedule.sigma_to_t (continuous: interpolates between timesteps)
    def sigma_to_t(self, sigma, quantize=None):
        log_sigma = sigma.detach().float().cpu().log()
        dists = log_sigma[:, None] - self.log_sigmas[None, :]
        if quantize if quantize is not None else self.quantize:
            return dists.abs().argmin(dim=1).view(sigma.shape).to(sigma.device)
        low = (dists >= 0).cumsum(dim=1).argmax(dim=1).clamp(max=len(self.sigmas) - 2)
        high = low + 1
        lo, hi = self.log_sigmas[low], self.log_sigmas[high]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * high).view(sigma.shape).to(sigma.device)

    # k_diffusion/external.py:DiscreteSchedule.t_to_sigma
    def t_to_sigma(self, t):
        t = t.float().cpu()
        low, high = t.floor().long(), t.ceil().long().clamp(max=len(self.sigmas) - 1)
        w = t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    # k_diffusion/external.py:DiscreteSchedule.get_sigmas
    def get_sigmas(self, n=None):
        t_max = len(self.sigmas) - 1
        t = torch.linspace(t_max, 0, n) if n is not None else torch.arange(t_max, -1, -1).float()
        return torch.cat([self.t_to_sigma(t), torch.zeros(1)])

    # k_diffusion/external.py:DiscreteEpsDDPMDenoiser.forward (c_in = 1/sqrt(sigma^2+1), denoised = x - sigma*eps)
    def __call__(self, input, sigma, **kwargs):
        c_in = 1 / (sigma ** 2 + 1) ** 0.5
        t = self.sigma_to_t(sigma).to(input.dtype)
        eps = self.inner_model.apply_model(input * c_in[:, None, None, None], t, **kwargs)
        return input - eps * sigma[:, None, None, None]


# k_diffusion/sampling.py:get_sigmas_karras
def get_sigmas_karras(n, sigma_min, sigma_max, rho=7., device='cpu'):
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])]).to(device)


def _derivative(x, sigma, denoised):
    # k_diffusion/sampling.py:to_d
    return (x - denoised) / sigma


# k_diffusion/sampling.py:sample_euler (no churn)
@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    extra_args = extra_args or {}
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': sigmas[i], 'sigma_hat': sigmas[i], 'denoised': denoised})
        x = x + _derivative(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


# k_diffusion/sampling.py:sample_euler_ancestral
@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1., noise_sampler=None):
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or (lambda s, s_next: torch.randn_like(x))
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        s, s_next = sigmas[i], sigmas[i + 1]
        sigma_up = min(s_next, eta * (s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2) ** 0.5)
        sigma_down = (s_next ** 2 - sigma_up ** 2) ** 0.5
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': s, 'sigma_hat': s, 'denoised': denoised})
        x = x + _derivative(x, s, denoised) * (sigma_down - s)
        if s_next > 0:
            x = x + noise_sampler(s, s_next) * s_noise * sigma_up
    return x


# k_diffusion/sampling.py:sample_dpm_2 (two model calls per step except the last)
@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None):
    extra_args = extra_args or {}
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, s * ones, **extra_args)
        if callback is not None:
            callback({'x': x, 'i': i, 'sigma': s, 'sigma_hat': s, 'denoised': denoised})
        d = _derivative(x, s, denoised)
        if s_next == 0:
            x = x + d * (s_next - s)
            continue
        s_mid = s.log().lerp(s_next.log(), 0.5).exp()
        x_mid = x + d * (s_mid - s)
        d_mid = _derivative(x_mid, s_mid, model(x_mid, s_mid * ones, **extra_args))
        x = x + d_mid * (s_next - s)
    return x


SAMPLING_FUNCTIONS = {
    "sample_euler": sample_euler,
    "sample_euler_ancestral": sample_euler_ancestral,
    "sample_dpm_2": sample_dpm_2,
    "sample_heun": sample_dpm_2,  # same call pattern (2 evaluations per step but the last)
}


class FakeEulerSampler:
    # modules/sd_samplers_kdiffusion.py:KDiffusionSampler (with modules/sd_samplers_common.py:Sampler)
    def __init__(self, funcname, sd_model, options=None):
        from modules import sd_samplers_cfg_denoiser

        self.funcname = funcname
        self.func = SAMPLING_FUNCTIONS[funcname] if isinstance(funcname, str) else funcname
        self.options = options or {}
        self.config: SamplerData = None  # set by sd_samplers.create_sampler
        self.extra_params = []
        self.eta = None
        self.stop_at = None
        self.last_latent = None
        self.s_min_uncond = None
        self.p = None
        self.sampler_extra_args = None
        self.conditioning_key = getattr(getattr(sd_model, "model", None), "conditioning_key", "crossattn")
        self.model_wrap_cfg = sd_samplers_cfg_denoiser.CFGDenoiser(self)
        self.model_wrap_cfg.inner_model = CompVisDenoiserLike(sd_model)
        self.model_wrap = self.model_wrap_cfg.inner_model

    # modules/sd_samplers_common.py:Sampler.callback_state
    def callback_state(self, d):
        step = d['i']
        if self.stop_at is not None and step > self.stop_at:
            raise InterruptedException
        state.sampling_step = step
        shared.total_tqdm.update()

    # modules/sd_samplers_common.py:Sampler.launch_sampling
    def launch_sampling(self, steps, func):
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = self.config.total_steps(steps) if self.config is not None else steps
        state.sampling_steps = steps
        state.sampling_step = 0
        try:
            return func()
        except InterruptedException:
            return self.last_latent

    # modules/sd_samplers_common.py:Sampler.initialize
    def initialize(self, p) -> dict:
        self.p = p
        cfg = self.model_wrap_cfg
        cfg.p = p
        cfg.mask = getattr(p, 'mask', None)
        cfg.nmask = getattr(p, 'nmask', None)
        cfg.step = 0
        cfg.image_cfg_scale = getattr(p, 'image_cfg_scale', None)
        self.eta = p.eta if getattr(p, 'eta', None) is not None else opts.eta_ancestral
        self.s_min_uncond = getattr(p, 's_min_uncond', 0.0)
        return {}

    # modules/sd_samplers_kdiffusion.py:KDiffusionSampler.get_sigmas
    def get_sigmas(self, p, steps):
        options = self.config.options if self.config is not None else self.options
        discard = options.get('discard_next_to_last_sigma', False) or opts.always_discard_next_to_last_sigma
        n = steps + 1 if discard else steps
        if getattr(p, "sampler_noise_scheduler_override", None):
            sigmas = p.sampler_noise_scheduler_override(n)
        elif options.get('scheduler') == 'karras':
            sigmas = get_sigmas_karras(n, self.model_wrap.sigma_min.item(), self.model_wrap.sigma_max.item())
        else:
            sigmas = self.model_wrap.get_sigmas(n)
        if discard:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        return sigmas

    def _extra_kwargs(self, p, x):
        # k-diffusion's ancestral noise comes from p.rng in webui (TorchHijack); same here
        if self.func is sample_euler_ancestral:
            rng = getattr(p, "rng", None)
            return {"eta": self.eta, "noise_sampler": (lambda s, s_next: rng.next()) if rng is not None else None}
        return {}

    # modules/sd_samplers_kdiffusion.py:KDiffusionSampler.sample
    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        sigmas = self.get_sigmas(p, steps)
        x = x * sigmas[0]
        self.initialize(p)
        return self.sample_with_sigmas(p, x, sigmas, conditioning, unconditional_conditioning, image_conditioning, steps)

    # modules/sd_samplers_kdiffusion.py:KDiffusionSampler.sample_img2img
    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps, t_enc = setup_img2img_steps(p, steps)
        sigmas = self.get_sigmas(p, steps)
        sigma_sched = sigmas[steps - t_enc - 1:]
        xi = x + noise * sigma_sched[0]
        self.initialize(p)
        self.model_wrap_cfg.init_latent = x
        return self.sample_with_sigmas(p, xi, sigma_sched, conditioning, unconditional_conditioning, image_conditioning, t_enc + 1)

    def sample_with_sigmas(self, p, x, sigmas, conditioning, unconditional_conditioning, image_conditioning=None, steps=None):
        """the common tail of sample()/sample_img2img(): extra_args as webui builds them, then launch_sampling.
        Tests may call it directly (after initialize(p)) with their own sigmas."""
        if self.p is not p:
            self.initialize(p)
        if image_conditioning is None:
            image_conditioning = x.new_zeros(x.shape[0], 5, 1, 1)
        self.last_latent = x
        self.sampler_extra_args = {
            'cond': conditioning,
            'image_cond': image_conditioning,
            'uncond': unconditional_conditioning,
            'cond_scale': p.cfg_scale,
            's_min_uncond': self.s_min_uncond,
        }
        kwargs = self._extra_kwargs(p, x)
        steps = steps if steps is not None else len(sigmas) - 1
        return self.launch_sampling(steps, lambda: self.func(self.model_wrap_cfg, x, sigmas, extra_args=self.sampler_extra_args,
                                                             callback=self.callback_state, disable=False, **kwargs))
