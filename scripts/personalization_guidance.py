"""webui always-on script: the "Personalization Guidance" accordion.

UI and webui lifecycle only; the work happens in lib_pg, through the host's folder in lib_pg/hosts.
"""

import os
import sys

from modules import script_callbacks, scripts

from lib_pg import hosts
from lib_pg import settings as pg_settings
from lib_pg.hosts.common import frontend

# webui's Controller, or the one of a supported fork (Forge, reForge), chosen by the packages the host ships.
CONTROLLER = hosts.controller()

TITLE = "Personalization Guidance"


def _label(labels, short):
    return next((label for label, value in labels.items() if value == short), short)


def _range_part(index):
    def read(params):
        text = params.get(frontend.KEY_RANGE)
        if frontend.KEY_OMEGA not in params:
            return None
        if not text:
            return (0.0, 1.0)[index]
        try:
            return float(str(text).split("-")[index])
        except (ValueError, IndexError):
            return None

    return read


class PersonalizationGuidanceScript(scripts.Script):
    sorting_priority = 15

    def __init__(self):
        super().__init__()
        # webui builds the scripts' UIs (xyz_grid's axis list included) before
        # its on_before_ui callbacks when started API-only (--nowebui): register
        # the [PG] axes as soon as webui instantiates the scripts, too.
        _register_xyz_axes()

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        # No side effects here: webui calls ui() again at API start-up for defaults.
        import gradio as gr
        from modules import sd_models, shared, ui_common

        tab = "img2img" if is_img2img else "txt2img"
        d = pg_settings.DEFAULTS
        with _accordion(gr, tab) as enabled:
            with gr.Row():
                omega = gr.Slider(0.0, 1.0, value=d.omega, step=0.01, elem_id=f"{tab}_pg_omega",
                                  label="Weak model strength ω (lower = stronger pull toward your subject; 1 = plain CFG)")
            with gr.Row():
                base = gr.Dropdown(choices=["", frontend.AUTOMATIC] + sd_models.checkpoint_tiles(),
                                   value=getattr(shared.opts, "pg_default_base", "") or "", elem_id=f"{tab}_pg_base",
                                   label="Base checkpoint (the one your model was trained from)")
                ui_common.create_refresh_button(base, sd_models.list_models,
                                                lambda: {"choices": ["", frontend.AUTOMATIC] + sd_models.checkpoint_tiles()},
                                                f"{tab}_pg_base_refresh")
            with gr.Row():
                strip_loras = gr.Textbox(value="", elem_id=f"{tab}_pg_strip_loras", max_lines=1,
                                         label="LoRAs to strip (names from the prompt, comma-separated; * = all)",
                                         placeholder="e.g. mydog   (empty: use the base checkpoint only)")
            with gr.Accordion("Advanced", open=False):
                weak_prompt = gr.Radio(list(pg_settings.WEAK_PROMPT_LABELS), value=_label(pg_settings.WEAK_PROMPT_LABELS, d.weak_prompt),
                                       elem_id=f"{tab}_pg_weak_prompt", label="Weak branch prompt")
                schedule = gr.Radio(list(pg_settings.SCHEDULE_LABELS), value=_label(pg_settings.SCHEDULE_LABELS, d.schedule),
                                    elem_id=f"{tab}_pg_schedule", label="ω schedule over the steps")
                omega_end = gr.Slider(0.0, 1.0, value=d.omega_end, step=0.01, elem_id=f"{tab}_pg_omega_end",
                                      label="ω at the end (linear / cosine schedule)")
                with gr.Row():
                    weights = gr.Radio(list(pg_settings.WEIGHTS_LABELS), value=_label(pg_settings.WEIGHTS_LABELS, d.weights),
                                       elem_id=f"{tab}_pg_weights",
                                       label="Weak weights from a base (Automatic: exact copies where they fit the memory, "
                                             "else low-rank factors)")
                    lean_budget = gr.Number(value=d.lean_budget_mb, precision=0, elem_id=f"{tab}_pg_lean_budget",
                                            label="Low-rank budget, MiB (0: 8 % of the exact copy)")
                with gr.Row():
                    start = gr.Slider(0.0, 1.0, value=d.start, step=0.01, elem_id=f"{tab}_pg_start", label="Active from (fraction of steps)")
                    end = gr.Slider(0.0, 1.0, value=d.end, step=0.01, elem_id=f"{tab}_pg_end", label="Active until (fraction of steps)")

        k = frontend
        self.infotext_fields = [
            (enabled, lambda params: k.KEY_OMEGA in params),
            (omega, k.KEY_OMEGA),
            (base, lambda params: params.get(k.KEY_BASE, "") if k.KEY_OMEGA in params else None),
            (weak_prompt, lambda params: _label(pg_settings.WEAK_PROMPT_LABELS, params.get(k.KEY_WEAK_PROMPT, "negative")) if k.KEY_OMEGA in params else None),
            (schedule, lambda params: _label(pg_settings.SCHEDULE_LABELS, params.get(k.KEY_SCHEDULE, "constant")) if k.KEY_OMEGA in params else None),
            (omega_end, lambda params: params.get(k.KEY_OMEGA_END, params.get(k.KEY_OMEGA))),
            (start, _range_part(0)),
            (end, _range_part(1)),
            (strip_loras, lambda params: params.get(k.KEY_STRIP, "") if k.KEY_OMEGA in params else None),
            (weights, lambda params: _label(pg_settings.WEIGHTS_LABELS, k.weights_from_infotext(params.get(k.KEY_WEIGHTS))[0])
             if k.KEY_OMEGA in params else None),
            (lean_budget, lambda params: k.weights_from_infotext(params.get(k.KEY_WEIGHTS))[1] if k.KEY_OMEGA in params else None),
        ]
        self.paste_field_names = [k.KEY_OMEGA, k.KEY_BASE, k.KEY_WEAK_PROMPT, k.KEY_SCHEDULE, k.KEY_OMEGA_END,
                                  k.KEY_RANGE, k.KEY_STRIP, k.KEY_WEIGHTS]
        # The order here is the API's positional order (lib_pg.settings.ARG_ORDER).
        return [enabled, omega, base, weak_prompt, schedule, omega_end, start, end, strip_loras, weights, lean_budget]

    def process(self, p, *args):
        CONTROLLER.prepare(p, args)

    def postprocess(self, p, processed, *args):
        CONTROLLER.after_generation()


def _accordion(gr, tab):
    """webui's InputAccordion (enable box in the header) where it exists (1.7+)."""
    try:
        from modules.ui_components import InputAccordion
    except ImportError:
        return _CheckboxAccordion(gr, tab)
    from modules import shared

    return InputAccordion(False, label=TITLE, elem_id=f"{tab}_pg_enabled", open=bool(getattr(shared.opts, "pg_accordion_open", False)))


class _CheckboxAccordion:
    """webui 1.6: a plain accordion whose first control is the enable box."""

    def __init__(self, gr, tab):
        self._accordion = gr.Accordion(TITLE, open=False, elem_id=f"{tab}_pg_accordion")
        self._gr, self._tab = gr, tab

    def __enter__(self):
        self._accordion.__enter__()
        return self._gr.Checkbox(False, label="Enable", elem_id=f"{self._tab}_pg_enabled")

    def __exit__(self, *exc):
        return self._accordion.__exit__(*exc)


def _on_script_unloaded():
    CONTROLLER.shutdown()
    for callback in (CONTROLLER.on_model_loaded, _on_script_unloaded, _register_xyz_axes):
        script_callbacks.remove_callbacks_for_function(callback)


script_callbacks.on_model_loaded(CONTROLLER.on_model_loaded)
script_callbacks.on_script_unloaded(_on_script_unloaded)


# -- the XYZ plot -----------------------------------------------------------
def _xyz_apply(key, convert=lambda x: x):
    def apply(p, value, _values):
        overrides = dict(getattr(p, frontend.XYZ_OVERRIDES, None) or {})  # p is a shallow copy per cell
        overrides[key] = convert(value)
        setattr(p, frontend.XYZ_OVERRIDES, overrides)

    return apply


def _xyz_confirm_bases(_p, values):
    from modules import sd_models

    for value in values:
        if value and sd_models.get_closet_checkpoint_match(value) is None:
            raise RuntimeError(f"Unknown base checkpoint for [PG] Base checkpoint: {value}")


def _xyz_enabled_choices():
    return ["False", "True"]


def _xyz_base_name(_p, _opt, value):
    """A base checkpoint's cell label: its file name without the folder."""
    return os.path.basename(str(value))


def make_axis_options(axis_option):
    """[PG] axes for the X/Y/Z plot, built with its own AxisOption(label, type, apply,
    format_value, confirm, cost, choices) class; the grid uses them as is. Only that class is
    taken from the host (its helpers moved between hosts: webui's scripts/xyz_grid.py has
    them, Forge Classic's lib_xyz package others). ω and base cost more than 0 so that grids
    iterate them in the outer loop: the weak weights are rebuilt once per distinct value."""
    from modules import sd_models

    checkpoints = lambda: sorted(sd_models.checkpoints_list, key=str.casefold)  # noqa: E731
    return [
        axis_option("[PG] Enabled", str, _xyz_apply("enabled", lambda x: x == "True"), choices=_xyz_enabled_choices),
        axis_option("[PG] ω", float, _xyz_apply("omega"), cost=0.4),
        axis_option("[PG] ω end", float, _xyz_apply("omega_end"), cost=0.3),
        axis_option("[PG] Base checkpoint", str, _xyz_apply("base"), format_value=_xyz_base_name,
                    confirm=_xyz_confirm_bases, cost=0.8, choices=checkpoints),
        axis_option("[PG] Weak prompt", str, _xyz_apply("weak_prompt"), choices=lambda: list(pg_settings.WEAK_PROMPTS)),
        axis_option("[PG] Strip LoRAs", str, _xyz_apply("strip_loras"), cost=0.4),
        axis_option("[PG] Weights", str, _xyz_apply_weights, confirm=_xyz_confirm_weights, cost=0.6,
                    choices=lambda: ["auto", "exact", "lean"]),
    ]


def _xyz_apply_weights(p, value, _values):
    """'auto', 'exact', 'lean' or 'lean 256' (a budget in MiB)."""
    mode, budget = frontend.weights_from_text(value)
    _xyz_apply("weights")(p, mode, _values)
    _xyz_apply("lean_budget_mb")(p, budget, _values)


def _xyz_confirm_weights(_p, values):
    for value in values:
        try:
            frontend.weights_from_text(value)
        except ValueError as error:
            raise RuntimeError(f"[PG] Weights: {error}") from None


def _xyz_axis_option(xyz_grid):
    """The X/Y/Z script's AxisOption class: in its module (webui, Forge, reForge, Neo, and
    Classic, which imports it there from lib_xyz.classes), else in Classic's lib_xyz."""
    axis_option = getattr(xyz_grid, "AxisOption", None)
    if axis_option is None:
        classes = sys.modules.get("lib_xyz.classes")
        axis_option = getattr(classes, "AxisOption", None)
    return axis_option


def _register_xyz_axes():
    """Add the [PG] axes to the X/Y/Z script's list, if the host has that script. Never raises:
    a host whose XYZ script PG does not recognise loses the axes, not PG (this runs while webui
    loads the scripts)."""
    try:
        xyz_grid = next((data.module for data in scripts.scripts_data if data.script_class.__module__ == "xyz_grid.py"), None)
        if xyz_grid is None:
            return
        axis_options = getattr(xyz_grid, "axis_options", None)
        axis_option = _xyz_axis_option(xyz_grid)
        if axis_options is None or axis_option is None:
            frontend.log("this webui's X/Y/Z plot script has no axis_options / AxisOption where PG looks: the [PG] axes are not added")
            return
        present = {option.label for option in axis_options}
        axis_options.extend(o for o in make_axis_options(axis_option) if o.label not in present)
    except Exception as error:  # noqa: BLE001 (webui's script loading must go on)
        frontend.log(f"Error: the [PG] X/Y/Z axes could not be added ({type(error).__name__}: {error}); PG itself works")


# -- Settings ---------------------------------------------------------------
def _add_settings():
    import gradio as gr
    from modules import sd_models, shared

    section = ("personalization_guidance", "Personalization Guidance")
    options = {
        "pg_default_base": shared.OptionInfo("", "Default base checkpoint ('Automatic': the closest checkpoint in weight space)",
                                             gr.Dropdown, lambda: {"choices": ["", frontend.AUTOMATIC] + sd_models.checkpoint_tiles()},
                                             refresh=sd_models.list_models, section=section),
        "pg_keep_weak_weights": shared.OptionInfo(True, "Keep the weak weights in memory between generations (faster; they hold memory while idle)",
                                                  section=section),
        "pg_memory_budget_mb": shared.OptionInfo(0, "Memory budget for the weak weights, MiB (0: the GPU's free memory less a margin; no limit on a CPU). "
                                                 "Above it automatic weights become low-rank factors; exact ones stop the generation with a message",
                                                 gr.Number, {"precision": 0}, section=section),
        "pg_accordion_open": shared.OptionInfo(False, "Open the Personalization Guidance accordion by default", section=section),
    }
    for key, info in options.items():
        shared.opts.add_option(key, info)


_add_settings()
script_callbacks.on_before_ui(_register_xyz_axes)
