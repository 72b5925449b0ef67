"""Fake of webui 1.10.1 modules/scripts.py: Script, AlwaysVisible and ScriptRunner.

ScriptRunner runs always-on scripts' hooks in the same order webui does and, like webui,
catches and only reports (errors.report) exceptions raised by a script's hook.  Scripts
are not discovered from disk: a test registers them with the helper
``ScriptRunner.add_script(script)`` (which also runs ``ui()`` against the fake gradio
to lay out ``args_from``/``args_to`` like ScriptRunner.setup_ui), and builds
``p.script_args`` with ``ScriptRunner.make_script_args({script: [values...]})``.
"""

from __future__ import annotations

import os
from collections import namedtuple
import re

from modules import errors, script_callbacks

AlwaysVisible = object()  # modules/scripts.py:AlwaysVisible


class MaskBlendArgs:
    # modules/scripts.py:MaskBlendArgs
    def __init__(self, current_latent, nmask, init_latent, mask, blended_latent, denoiser=None, sigma=None):
        self.current_latent = current_latent
        self.nmask = nmask
        self.init_latent = init_latent
        self.mask = mask
        self.blended_latent = blended_latent
        self.denoiser = denoiser
        self.is_final_blend = denoiser is None
        self.sigma = sigma


class PostSampleArgs:
    # modules/scripts.py:PostSampleArgs
    def __init__(self, samples):
        self.samples = samples


class PostprocessImageArgs:
    # modules/scripts.py:PostprocessImageArgs
    def __init__(self, image):
        self.image = image


class PostProcessMaskOverlayArgs:
    # modules/scripts.py:PostProcessMaskOverlayArgs
    def __init__(self, index, mask_for_overlay, overlay_image):
        self.index = index
        self.mask_for_overlay = mask_for_overlay
        self.overlay_image = overlay_image


class PostprocessBatchListArgs:
    # modules/scripts.py:PostprocessBatchListArgs
    def __init__(self, images):
        self.images = images


class Script:
    # modules/scripts.py:Script (hooks are no-ops; the runner skips hooks a subclass did not override)
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None
    on_before_component_elem_id = None
    on_after_component_elem_id = None
    setup_for_ui_only = False
    controls = None

    # modules/scripts.py:Script.title
    def title(self):
        raise NotImplementedError()

    # modules/scripts.py:Script.ui
    def ui(self, is_img2img):
        pass

    # modules/scripts.py:Script.show
    def show(self, is_img2img):
        return True

    # modules/scripts.py:Script.run
    def run(self, p, *args):
        pass

    # modules/scripts.py:Script.setup
    def setup(self, p, *args):
        pass

    # modules/scripts.py:Script.before_process
    def before_process(self, p, *args):
        pass

    # modules/scripts.py:Script.process
    def process(self, p, *args):
        pass

    # modules/scripts.py:Script.before_process_batch
    def before_process_batch(self, p, *args, **kwargs):
        pass

    # modules/scripts.py:Script.after_extra_networks_activate
    def after_extra_networks_activate(self, p, *args, **kwargs):
        pass

    # modules/scripts.py:Script.process_before_every_sampling
    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    # modules/scripts.py:Script.process_batch
    def process_batch(self, p, *args, **kwargs):
        pass

    # modules/scripts.py:Script.postprocess_batch
    def postprocess_batch(self, p, *args, **kwargs):
        pass

    # modules/scripts.py:Script.postprocess_batch_list
    def postprocess_batch_list(self, p, pp: PostprocessBatchListArgs, *args, **kwargs):
        pass

    # modules/scripts.py:Script.on_mask_blend
    def on_mask_blend(self, p, mba: MaskBlendArgs, *args):
        pass

    # modules/scripts.py:Script.post_sample
    def post_sample(self, p, ps: PostSampleArgs, *args):
        pass

    # modules/scripts.py:Script.postprocess_image
    def postprocess_image(self, p, pp: PostprocessImageArgs, *args):
        pass

    # modules/scripts.py:Script.postprocess_maskoverlay
    def postprocess_maskoverlay(self, p, ppmo: PostProcessMaskOverlayArgs, *args):
        pass

    # modules/scripts.py:Script.postprocess_image_after_composite
    def postprocess_image_after_composite(self, p, pp: PostprocessImageArgs, *args):
        pass

    # modules/scripts.py:Script.postprocess
    def postprocess(self, p, processed, *args):
        pass

    # modules/scripts.py:Script.before_component
    def before_component(self, component, **kwargs):
        pass

    # modules/scripts.py:Script.after_component
    def after_component(self, component, **kwargs):
        pass

    # modules/scripts.py:Script.describe
    def describe(self):
        return ""

    # modules/scripts.py:Script.elem_id
    def elem_id(self, item_id):
        need_tabname = self.show(True) == self.show(False)
        tabname = f"{'img2img' if self.is_img2img else 'txt2img'}_" if need_tabname else ""
        title = re.sub(r'[^a-z_0-9]', '', re.sub(r'\s', '_', self.title().lower()))
        return f'script_{tabname}{title}_{item_id}'

    # modules/scripts.py:Script.before_hr
    def before_hr(self, p, *args):
        pass


# modules/scripts.py:wrap_call
def wrap_call(func, filename, funcname, *args, default=None, **kwargs):
    try:
        return func(*args, **kwargs)
    except Exception:
        errors.report(f"Error calling: {filename}/{funcname}", exc_info=True)
    return default


class ScriptRunner:
    # modules/scripts.py:ScriptRunner
    def __init__(self):
        self.scripts = []
        self.selectable_scripts = []
        self.alwayson_scripts = []
        self.titles = []
        self.title_map = {}
        self.infotext_fields = []
        self.paste_field_names = []
        self.inputs = [None]
        self.default_args = [0]
        """test helper data: index 0 is the selectable-script dropdown ('None'), then each script's ui() values"""
        self.callback_map = {}

    def add_script(self, script, *, is_img2img=False, filename=None, args=None):
        """test helper standing in for ScriptRunner.initialize_scripts + setup_ui for one script.

        ``script`` is a Script instance or class.  Without ``args`` its ui() is built with the
        fake gradio and the components' values become the default args; with ``args`` (a list)
        ui() is not called and the list gives the defaults.  Returns the script instance.
        """
        if isinstance(script, type):
            script = script()
        script.filename = filename or script.filename or os.path.abspath(f"{type(script).__name__}.py")
        script.is_txt2img = not is_img2img
        script.is_img2img = is_img2img
        script.tabname = "img2img" if is_img2img else "txt2img"

        visibility = script.show(script.is_img2img)
        if visibility == AlwaysVisible:
            script.alwayson = True
            self.scripts.append(script)
            self.alwayson_scripts.append(script)
        elif visibility:
            self.scripts.append(script)
            self.selectable_scripts.append(script)
            self.titles.append(wrap_call(script.title, script.filename, "title") or script.filename)
        else:
            return script

        title = wrap_call(script.title, script.filename, "title") or script.filename
        self.title_map[title.lower()] = script
        script.name = title.lower()

        script.args_from = script.args_to = len(self.inputs)
        if args is not None:
            controls, values = [None] * len(args), list(args)
        else:
            controls = wrap_call(script.ui, script.filename, "ui", script.is_img2img) or []
            values = [getattr(c, "value", None) for c in controls]
            if script.infotext_fields is not None:
                self.infotext_fields += script.infotext_fields
            if script.paste_field_names is not None:
                self.paste_field_names += script.paste_field_names
        script.controls = controls
        self.inputs += controls
        self.default_args += values
        script.args_to = len(self.inputs)
        self.callback_map.clear()
        return script

    def make_script_args(self, values=None):
        """test helper: the full positional script_args list (defaults, with ``values[script]``
        written at that script's args_from), as the UI/API would send it."""
        args = list(self.default_args)
        for script, vals in (values or {}).items():
            vals = list(vals)
            args[script.args_from:script.args_from + len(vals)] = vals
        return args

    # modules/scripts.py:ScriptRunner.run
    def run(self, p, *args):
        script_index = args[0]
        if not script_index:
            return None
        script = self.selectable_scripts[script_index - 1]
        return script.run(p, *args[script.args_from:script.args_to])

    # modules/scripts.py:ScriptRunner.list_scripts_for_method
    def list_scripts_for_method(self, method_name):
        return self.scripts if method_name in ('before_component', 'after_component') else self.alwayson_scripts

    # modules/scripts.py:ScriptRunner.create_ordered_callbacks_list
    def create_ordered_callbacks_list(self, method_name, *, enable_user_sort=True):
        category = f'script_{method_name}'
        callbacks = []
        for script in self.list_scripts_for_method(method_name):
            if getattr(script.__class__, method_name, None) == getattr(Script, method_name, None):
                continue
            script_callbacks.add_callback(callbacks, script, category=category, name=script.__class__.__name__, filename=script.filename)
        return script_callbacks.sort_callbacks(category, callbacks, enable_user_sort=enable_user_sort)

    # modules/scripts.py:ScriptRunner.ordered_callbacks
    def ordered_callbacks(self, method_name, *, enable_user_sort=True):
        script_list = self.list_scripts_for_method(method_name)
        category = f'script_{method_name}'
        count, callbacks = self.callback_map.get(category, (-1, None))
        if callbacks is None or count != len(script_list):
            callbacks = self.create_ordered_callbacks_list(method_name, enable_user_sort=enable_user_sort)
            self.callback_map[category] = len(script_list), callbacks
        return callbacks

    # modules/scripts.py:ScriptRunner.ordered_scripts
    def ordered_scripts(self, method_name):
        return [x.callback for x in self.ordered_callbacks(method_name)]

    def _each(self, method_name, label, p, *extra, **kwargs):
        # the loop every ScriptRunner hook method shares: call, report and swallow exceptions
        for script in self.ordered_scripts(method_name):
            try:
                script_args = p.script_args[script.args_from:script.args_to]
                getattr(script, method_name)(p, *extra, *script_args, **kwargs)
            except Exception:
                errors.report(f"Error running {label}: {script.filename}", exc_info=True)

    # modules/scripts.py:ScriptRunner.setup_scrips
    def setup_scrips(self, p, *, is_ui=True):
        for script in self.ordered_scripts('setup'):
            if not is_ui and script.setup_for_ui_only:
                continue
            try:
                script.setup(p, *p.script_args[script.args_from:script.args_to])
            except Exception:
                errors.report(f"Error running setup: {script.filename}", exc_info=True)

    # modules/scripts.py:ScriptRunner.before_process
    def before_process(self, p):
        self._each('before_process', 'before_process', p)

    # modules/scripts.py:ScriptRunner.process
    def process(self, p):
        self._each('process', 'process', p)

    # modules/scripts.py:ScriptRunner.process_before_every_sampling
    def process_before_every_sampling(self, p, **kwargs):
        self._each('process_before_every_sampling', 'process_before_every_sampling', p, **kwargs)

    # modules/scripts.py:ScriptRunner.before_process_batch
    def before_process_batch(self, p, **kwargs):
        self._each('before_process_batch', 'before_process_batch', p, **kwargs)

    # modules/scripts.py:ScriptRunner.after_extra_networks_activate
    def after_extra_networks_activate(self, p, **kwargs):
        self._each('after_extra_networks_activate', 'after_extra_networks_activate', p, **kwargs)

    # modules/scripts.py:ScriptRunner.process_batch
    def process_batch(self, p, **kwargs):
        self._each('process_batch', 'process_batch', p, **kwargs)

    # modules/scripts.py:ScriptRunner.postprocess
    def postprocess(self, p, processed):
        self._each('postprocess', 'postprocess', p, processed)

    # modules/scripts.py:ScriptRunner.postprocess_batch
    def postprocess_batch(self, p, images, **kwargs):
        self._each('postprocess_batch', 'postprocess_batch', p, images=images, **kwargs)

    # modules/scripts.py:ScriptRunner.postprocess_batch_list
    def postprocess_batch_list(self, p, pp: PostprocessBatchListArgs, **kwargs):
        self._each('postprocess_batch_list', 'postprocess_batch_list', p, pp, **kwargs)

    # modules/scripts.py:ScriptRunner.post_sample
    def post_sample(self, p, ps: PostSampleArgs):
        self._each('post_sample', 'post_sample', p, ps)

    # modules/scripts.py:ScriptRunner.on_mask_blend
    def on_mask_blend(self, p, mba: MaskBlendArgs):
        self._each('on_mask_blend', 'post_sample', p, mba)

    # modules/scripts.py:ScriptRunner.postprocess_image
    def postprocess_image(self, p, pp: PostprocessImageArgs):
        self._each('postprocess_image', 'postprocess_image', p, pp)

    # modules/scripts.py:ScriptRunner.before_hr
    def before_hr(self, p):
        self._each('before_hr', 'before_hr', p)

    # modules/scripts.py:ScriptRunner.script
    def script(self, title):
        return self.title_map.get(title.lower())


# modules/scripts.py:ScriptClassData / scripts_data (the loaded script files; extensions find xyz_grid here)
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data = []
