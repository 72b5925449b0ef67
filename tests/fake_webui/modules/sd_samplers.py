"""Fake of webui 1.10.1 modules/sd_samplers.py (sampler registry and lookup).

The registry holds "Euler", "Euler a", "Heun", "DPM2" (second order: total_steps
doubles) and "DDIM", all with webui's names, aliases and options.  Every entry
constructs a sd_samplers_common.FakeEulerSampler; "DDIM" runs deterministic Euler steps
in sigma space (what DDIM with eta=0 amounts to) instead of webui's timestep sampler,
so for it the denoiser also receives sigmas, not timesteps.
"""

from __future__ import annotations

from modules import sd_samplers_common

samples_to_image_grid = None
sample_to_image = None


def _constructor(funcname):
    # what sd_samplers_kdiffusion.py:samplers_data_k_diffusion's lambdas do
    return lambda model, funcname=funcname: sd_samplers_common.FakeEulerSampler(funcname, model)


all_samplers = [
    sd_samplers_common.SamplerData('Euler a', _constructor('sample_euler_ancestral'), ['k_euler_a', 'k_euler_ancestral'], {"uses_ensd": True}),
    sd_samplers_common.SamplerData('Euler', _constructor('sample_euler'), ['k_euler'], {}),
    sd_samplers_common.SamplerData('Heun', _constructor('sample_heun'), ['k_heun'], {"second_order": True}),
    sd_samplers_common.SamplerData('DPM2', _constructor('sample_dpm_2'), ['k_dpm_2'], {'scheduler': 'karras', 'discard_next_to_last_sigma': True, "second_order": True}),
    sd_samplers_common.SamplerData('DDIM', _constructor('sample_euler'), ['ddim'], {"default_eta_is_0": True, "uses_ensd": True}),
]  # modules/sd_samplers.py:all_samplers
all_samplers_map = {x.name: x for x in all_samplers}  # modules/sd_samplers.py:all_samplers_map
samplers = all_samplers
samplers_for_img2img = all_samplers
samplers_map = {}
samplers_hidden = set()


# modules/sd_samplers.py:find_sampler_config
def find_sampler_config(name):
    if name is None:
        return all_samplers[0]
    return all_samplers_map.get(name, None)


# modules/sd_samplers.py:create_sampler
def create_sampler(name, model):
    config = find_sampler_config(name)
    assert config is not None, f'bad sampler name: {name}'
    sampler = config.constructor(model)
    sampler.config = config
    return sampler


# modules/sd_samplers.py:set_samplers
def set_samplers():
    samplers_map.clear()
    for sampler in all_samplers:
        samplers_map[sampler.name.lower()] = sampler.name
        for alias in sampler.aliases:
            samplers_map[alias.lower()] = sampler.name


# modules/sd_samplers.py:visible_sampler_names
def visible_sampler_names():
    return [x.name for x in samplers if x.name not in samplers_hidden]


set_samplers()
