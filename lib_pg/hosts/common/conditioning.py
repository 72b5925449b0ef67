"""The weak branch's text conditioning, computed with the host's own prompt parser."""

from contextlib import nullcontext

from lib_pg.patching import swapped_parameters
from lib_pg.routing import corrected_text_layers, text_encoder_swaps

from modules import devices, prompt_parser, sd_samplers, shared  # noqa: E402


class WeakConditioning:
    """The weak branch's text conditioning, where it differs from the host's.

    Needed when the text encoders of base and active model differ (then the
    interpolated text encoder computes it) or the weak prompt is the empty
    prompt. Computed with the front end's own prompt_parser.get_learned_conditioning,
    with the same arguments as modules/processing.py setup_conds() /
    calculate_hr_conds(), so prompt editing and SDXL's zeroed empty negative
    prompt behave as in webui. Cached per pass and ω.
    """

    def __init__(self, p, settings, weak, model):
        self.p, self.settings, self.weak, self.model = p, settings, weak, model
        self.needed = weak.text_differs or settings.weak_prompt == "empty"
        self._cache = {}

    def at(self, omega, step):
        hires = bool(getattr(self.p, "is_hr_pass", False))
        te_omega = omega if self.weak.text_differs else 1.0
        key = (hires, te_omega)
        if key not in self._cache:
            self._cache[key] = self._compute(hires, te_omega)
        return prompt_parser.reconstruct_cond_batch(self._cache[key], step)

    def _compute(self, hires, omega):
        p = self.p
        if hires:
            prompts, width, height = p.hr_negative_prompts, p.hr_upscale_to_x, p.hr_upscale_to_y
            config = sd_samplers.find_sampler_config(p.hr_sampler_name or p.sampler_name)
            steps = p.hr_second_pass_steps or p.steps
            hires_steps = config.total_steps(steps) if config else steps
        else:
            prompts, width, height, hires_steps = p.negative_prompts, p.width, p.height, None
        if self.settings.weak_prompt == "empty":
            prompts = [""] * len(prompts)
        conditioning = prompt_parser.SdConditioning(list(prompts), width=width, height=height, is_negative_prompt=True)
        weak_text = omega < 1.0
        swaps = text_encoder_swaps(self.weak.text, omega) if weak_text else ()
        corrected = corrected_text_layers(self.weak.text, omega) if weak_text else nullcontext()
        scope = self.weak.text_scope(omega) if self.weak.text_scope is not None and weak_text else nullcontext()
        # webui 1.8+ and Forge/reForge pass the "old scheduling" option; Forge Neo removed it (and the argument)
        old_scheduling = getattr(shared.opts, "use_old_scheduling", None)
        extra = () if old_scheduling is None else (old_scheduling,)
        with swapped_parameters(swaps), corrected, scope, devices.autocast():
            return prompt_parser.get_learned_conditioning(self.model, conditioning, p.firstpass_steps, hires_steps, *extra)
