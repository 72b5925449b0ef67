"""Fake of webui 1.10.1 modules/script_callbacks.py.

Same registry layout as webui (``callback_map`` of ``callbacks_<category>`` lists of
ScriptCallback, plus the ``ordered_callbacks_map`` cache), the same on_*/..._callback
pairs for the categories the fake pipeline fires, and the same error handling: an
exception raised by a callback is reported (errors.report) and swallowed.
``clear_callbacks()`` is the real function and also the test helper.
"""

from __future__ import annotations

import dataclasses
import inspect
import os

from modules import errors, shared


# modules/script_callbacks.py:report_exception
def report_exception(c, job):
    errors.report(f"Error executing callback {job} for {c.script}", exc_info=True)


class ExtraNoiseParams:
    # modules/script_callbacks.py:ExtraNoiseParams
    def __init__(self, noise, x, xi):
        self.noise = noise
        self.x = x
        self.xi = xi


class CFGDenoiserParams:
    # modules/script_callbacks.py:CFGDenoiserParams
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser


class CFGDenoisedParams:
    # modules/script_callbacks.py:CFGDenoisedParams
    def __init__(self, x, sampling_step, total_sampling_steps, inner_model):
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.inner_model = inner_model


class AfterCFGCallbackParams:
    # modules/script_callbacks.py:AfterCFGCallbackParams
    def __init__(self, x, sampling_step, total_sampling_steps):
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps


@dataclasses.dataclass
class ScriptCallback:
    # modules/script_callbacks.py:ScriptCallback
    script: str
    callback: any
    name: str = "unnamed"


def _extension_name(filename):
    # stands in for modules/extensions.py:find_extension: the folder under the last "extensions" folder
    parts = os.path.normpath(filename).split(os.sep)[:-1]
    idx = [i for i, part in enumerate(parts) if part in ("extensions", "extensions-builtin")]
    return parts[idx[-1] + 1] if idx and idx[-1] + 1 < len(parts) else "base"


# modules/script_callbacks.py:add_callback
def add_callback(callbacks, fun, *, name=None, category='unknown', filename=None):
    if filename is None:
        outside = [frame.filename for frame in inspect.stack() if frame.filename != __file__]
        filename = outside[0] if outside else 'unknown file'

    base = f"{_extension_name(filename)}/{os.path.basename(filename)}/{category}"
    if name is not None:
        base += f"/{name}"

    taken = {c.name for c in callbacks}
    unique = base
    n = 0
    while unique in taken and n < 1000:
        n += 1
        unique = f"{base}-{n}"

    callbacks.append(ScriptCallback(filename, fun, unique))


# modules/script_callbacks.py:sort_callbacks (extension metadata ordering omitted; user priorities kept)
def sort_callbacks(category, unordered_callbacks, *, enable_user_sort=True):
    callbacks = list(unordered_callbacks)
    if enable_user_sort:
        for name in reversed(getattr(shared.opts, 'prioritized_callbacks_' + category, [])):
            found = [i for i, c in enumerate(callbacks) if c.name == name]
            if found:
                callbacks.insert(0, callbacks.pop(found[0]))
    return callbacks


# modules/script_callbacks.py:ordered_callbacks
def ordered_callbacks(category, unordered_callbacks=None, *, enable_user_sort=True):
    if unordered_callbacks is None:
        unordered_callbacks = callback_map.get('callbacks_' + category, [])

    if not enable_user_sort:
        return sort_callbacks(category, unordered_callbacks, enable_user_sort=False)

    cached = ordered_callbacks_map.get(category)
    if cached is not None and len(cached) == len(unordered_callbacks):
        return cached

    ordered_callbacks_map[category] = sort_callbacks(category, unordered_callbacks)
    return ordered_callbacks_map[category]


# modules/script_callbacks.py:enumerate_callbacks
def enumerate_callbacks():
    for category, callbacks in callback_map.items():
        yield category[len('callbacks_'):] if category.startswith('callbacks_') else category, callbacks


callback_map = {f"callbacks_{name}": [] for name in (
    "app_started", "model_loaded", "ui_tabs", "ui_train_tabs", "ui_settings", "before_image_saved", "image_saved",
    "extra_noise", "cfg_denoiser", "cfg_denoised", "cfg_after_cfg", "before_component", "after_component",
    "image_grid", "infotext_pasted", "script_unloaded", "before_ui", "on_reload", "list_optimizers", "list_unets",
    "before_token_counter")}  # modules/script_callbacks.py:callback_map

ordered_callbacks_map = {}  # modules/script_callbacks.py:ordered_callbacks_map


# modules/script_callbacks.py:clear_callbacks
def clear_callbacks():
    for callback_list in callback_map.values():
        callback_list.clear()
    ordered_callbacks_map.clear()


def _run(category, job, *args, reverse=False):
    # iterates the live ordered list like webui does (a callback removing itself mid-run behaves the same)
    callbacks = ordered_callbacks(category)
    for c in (reversed(callbacks) if reverse else callbacks):
        try:
            c.callback(*args)
        except Exception:
            report_exception(c, job)


# modules/script_callbacks.py:app_started_callback
def app_started_callback(demo, app):
    _run('app_started', 'app_started_callback', demo, app)


# modules/script_callbacks.py:app_reload_callback
def app_reload_callback():
    _run('on_reload', 'callbacks_on_reload')


# modules/script_callbacks.py:model_loaded_callback
def model_loaded_callback(sd_model):
    _run('model_loaded', 'model_loaded_callback', sd_model)


# modules/script_callbacks.py:ui_settings_callback
def ui_settings_callback():
    _run('ui_settings', 'ui_settings_callback')


# modules/script_callbacks.py:extra_noise_callback
def extra_noise_callback(params: ExtraNoiseParams):
    _run('extra_noise', 'callbacks_extra_noise', params)


# modules/script_callbacks.py:cfg_denoiser_callback
def cfg_denoiser_callback(params: CFGDenoiserParams):
    _run('cfg_denoiser', 'cfg_denoiser_callback', params)


# modules/script_callbacks.py:cfg_denoised_callback
def cfg_denoised_callback(params: CFGDenoisedParams):
    _run('cfg_denoised', 'cfg_denoised_callback', params)


# modules/script_callbacks.py:cfg_after_cfg_callback
def cfg_after_cfg_callback(params: AfterCFGCallbackParams):
    _run('cfg_after_cfg', 'cfg_after_cfg_callback', params)


# modules/script_callbacks.py:before_component_callback
def before_component_callback(component, **kwargs):
    for c in ordered_callbacks('before_component'):
        try:
            c.callback(component, **kwargs)
        except Exception:
            report_exception(c, 'before_component_callback')


# modules/script_callbacks.py:after_component_callback
def after_component_callback(component, **kwargs):
    for c in ordered_callbacks('after_component'):
        try:
            c.callback(component, **kwargs)
        except Exception:
            report_exception(c, 'after_component_callback')


# modules/script_callbacks.py:infotext_pasted_callback
def infotext_pasted_callback(infotext: str, params):
    _run('infotext_pasted', 'infotext_pasted', infotext, params)


# modules/script_callbacks.py:script_unloaded_callback (runs in reverse registration order)
def script_unloaded_callback():
    _run('script_unloaded', 'script_unloaded', reverse=True)


# modules/script_callbacks.py:before_ui_callback (runs in reverse registration order)
def before_ui_callback():
    _run('before_ui', 'before_ui', reverse=True)


# modules/script_callbacks.py:remove_current_script_callbacks
def remove_current_script_callbacks():
    outside = [frame.filename for frame in inspect.stack() if frame.filename != __file__]
    if not outside:
        return
    filename = outside[0]
    for lst in list(callback_map.values()) + list(ordered_callbacks_map.values()):
        lst[:] = [cb for cb in lst if cb.script != filename]


# modules/script_callbacks.py:remove_callbacks_for_function
def remove_callbacks_for_function(callback_func):
    for lst in list(callback_map.values()) + list(ordered_callbacks_map.values()):
        for cb in [cb for cb in lst if cb.callback == callback_func]:
            lst.remove(cb)


# modules/script_callbacks.py:on_app_started
def on_app_started(callback, *, name=None):
    add_callback(callback_map['callbacks_app_started'], callback, name=name, category='app_started')


# modules/script_callbacks.py:on_before_reload
def on_before_reload(callback, *, name=None):
    add_callback(callback_map['callbacks_on_reload'], callback, name=name, category='on_reload')


# modules/script_callbacks.py:on_model_loaded
def on_model_loaded(callback, *, name=None):
    add_callback(callback_map['callbacks_model_loaded'], callback, name=name, category='model_loaded')


# modules/script_callbacks.py:on_ui_tabs
def on_ui_tabs(callback, *, name=None):
    add_callback(callback_map['callbacks_ui_tabs'], callback, name=name, category='ui_tabs')


# modules/script_callbacks.py:on_ui_settings
def on_ui_settings(callback, *, name=None):
    add_callback(callback_map['callbacks_ui_settings'], callback, name=name, category='ui_settings')


# modules/script_callbacks.py:on_extra_noise
def on_extra_noise(callback, *, name=None):
    add_callback(callback_map['callbacks_extra_noise'], callback, name=name, category='extra_noise')


# modules/script_callbacks.py:on_cfg_denoiser
def on_cfg_denoiser(callback, *, name=None):
    add_callback(callback_map['callbacks_cfg_denoiser'], callback, name=name, category='cfg_denoiser')


# modules/script_callbacks.py:on_cfg_denoised
def on_cfg_denoised(callback, *, name=None):
    add_callback(callback_map['callbacks_cfg_denoised'], callback, name=name, category='cfg_denoised')


# modules/script_callbacks.py:on_cfg_after_cfg
def on_cfg_after_cfg(callback, *, name=None):
    add_callback(callback_map['callbacks_cfg_after_cfg'], callback, name=name, category='cfg_after_cfg')


# modules/script_callbacks.py:on_before_component
def on_before_component(callback, *, name=None):
    add_callback(callback_map['callbacks_before_component'], callback, name=name, category='before_component')


# modules/script_callbacks.py:on_after_component
def on_after_component(callback, *, name=None):
    add_callback(callback_map['callbacks_after_component'], callback, name=name, category='after_component')


# modules/script_callbacks.py:on_infotext_pasted
def on_infotext_pasted(callback, *, name=None):
    add_callback(callback_map['callbacks_infotext_pasted'], callback, name=name, category='infotext_pasted')


# modules/script_callbacks.py:on_script_unloaded
def on_script_unloaded(callback, *, name=None):
    add_callback(callback_map['callbacks_script_unloaded'], callback, name=name, category='script_unloaded')


# modules/script_callbacks.py:on_before_ui
def on_before_ui(callback, *, name=None):
    add_callback(callback_map['callbacks_before_ui'], callback, name=name, category='before_ui')
