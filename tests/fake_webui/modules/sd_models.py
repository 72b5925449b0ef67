"""Fake of webui 1.10.1 modules/sd_models.py: the checkpoint registry, checkpoint reading,
model switching, plus ``FakeSdModel``, the stand-in for the loaded model object
(ldm's LatentDiffusion / sgm's DiffusionEngine as webui prepares them in load_model).

Tests set ``model_path`` (a folder) and call ``list_models()``, or register single files
with ``CheckpointInfo(path).register()``; ``set_model(FakeSdModel(inner), info)`` makes a
model the loaded one (shared.sd_model, opts.sd_model_checkpoint, on_model_loaded
callbacks).  ``reload_model_weights`` cannot load anything by itself: when the wanted
checkpoint is not the loaded one it calls ``processing.switch_checkpoint_hook(title)``
(if a test set one) and makes the model that hook returns the loaded one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re

import safetensors.torch
import torch

from modules import devices, errors, script_callbacks, shared

model_dir = "Stable-diffusion"
model_path = os.path.abspath(os.path.join("models", model_dir))  # modules/sd_models.py:model_path (tests set it)

checkpoints_list = {}  # modules/sd_models.py:checkpoints_list
checkpoint_aliases = {}  # modules/sd_models.py:checkpoint_aliases
checkpoint_alisases = checkpoint_aliases
checkpoints_loaded = {}

_sha256_cache = {}


def _sha256(filename):
    # modules/hashes.py:sha256 (cached per path, size and mtime)
    st = os.stat(filename)
    key = (os.path.abspath(filename), st.st_size, st.st_mtime_ns)
    if key not in _sha256_cache:
        h = hashlib.sha256()
        with open(filename, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _sha256_cache[key] = h.hexdigest()
    return _sha256_cache[key]


# modules/sd_models.py:model_hash
def model_hash(filename):
    try:
        with open(filename, "rb") as file:
            file.seek(0x100000)
            return hashlib.sha256(file.read(0x10000)).hexdigest()[0:8]
    except FileNotFoundError:
        return 'NOFILE'


# modules/sd_models.py:read_metadata_from_safetensors
def read_metadata_from_safetensors(filename):
    with open(filename, mode="rb") as file:
        metadata_len = int.from_bytes(file.read(8), "little")
        json_start = file.read(2)
        assert metadata_len > 2 and json_start in (b'{"', b"{'"), f"{filename} is not a safetensors file"
        header = json.loads(json_start + file.read(metadata_len - 2))
    res = {}
    for k, v in header.get("__metadata__", {}).items():
        res[k] = v
        if isinstance(v, str) and v[0:1] == '{':
            with contextlib.suppress(Exception):
                res[k] = json.loads(v)
    return res


class CheckpointInfo:
    # modules/sd_models.py:CheckpointInfo (sha256 computed eagerly, as if webui's hash cache had it)
    def __init__(self, filename):
        self.filename = filename
        abspath = os.path.abspath(filename)
        ckpt_dir = os.path.abspath(shared.cmd_opts.ckpt_dir) if shared.cmd_opts.ckpt_dir is not None else None
        root = os.path.abspath(model_path)

        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        if ckpt_dir and abspath.startswith(ckpt_dir):
            name = abspath[len(ckpt_dir):]
        elif abspath.startswith(root):
            name = abspath[len(root):]
        else:
            name = os.path.basename(filename)
        name = name.lstrip("\\/")

        self.metadata = {}
        if self.is_safetensors:
            try:
                self.metadata = read_metadata_from_safetensors(filename)
            except Exception as e:
                errors.display(e, f"reading metadata for {filename}")

        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = model_hash(filename)
        self.sha256 = _sha256(filename) if os.path.exists(filename) else None
        self.shorthash = self.sha256[0:10] if self.sha256 else None

        self.title = name if self.shorthash is None else f'{name} [{self.shorthash}]'
        self.short_title = self.name_for_extra if self.shorthash is None else f'{self.name_for_extra} [{self.shorthash}]'

        self.ids = [self.hash, self.model_name, self.title, name, self.name_for_extra, f'{name} [{self.hash}]']
        if self.shorthash:
            self.ids += [self.shorthash, self.sha256, f'{self.name} [{self.shorthash}]', f'{self.name_for_extra} [{self.shorthash}]']

    # modules/sd_models.py:CheckpointInfo.register
    def register(self):
        checkpoints_list[self.title] = self
        for id in self.ids:
            checkpoint_aliases[id] = self

    # modules/sd_models.py:CheckpointInfo.calculate_shorthash
    def calculate_shorthash(self):
        return self.shorthash

    # fake-only: readable repr
    def __repr__(self):
        return f"<CheckpointInfo {self.title!r}>"


# modules/sd_models.py:checkpoint_tiles
def checkpoint_tiles(use_short=False):
    return [info.short_title if use_short else info.title for info in checkpoints_list.values()]


# modules/sd_models.py:list_models (scans cmd_opts.ckpt_dir, then model_path; no download)
def list_models():
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    places = [shared.cmd_opts.ckpt_dir] if shared.cmd_opts.ckpt_dir else []
    places.append(model_path)
    found = []
    for place in places:
        if not os.path.isdir(place):
            continue
        for root, _, files in sorted(os.walk(place, followlinks=True)):
            for fn in sorted(files):
                full = os.path.join(root, fn)
                low = fn.lower()
                if not low.endswith((".ckpt", ".safetensors")) or low.endswith((".vae.ckpt", ".vae.safetensors")):
                    continue
                if full not in found:
                    found.append(full)
    for filename in found:
        CheckpointInfo(filename).register()


re_strip_checksum = re.compile(r"\s*\[[^]]+]\s*$")  # modules/sd_models.py:re_strip_checksum


# modules/sd_models.py:get_closet_checkpoint_match
def get_closet_checkpoint_match(search_string):
    if not search_string:
        return None
    info = checkpoint_aliases.get(search_string, None)
    if info is not None:
        return info
    for needle in (search_string, re.sub(re_strip_checksum, '', search_string)):
        found = sorted((x for x in checkpoints_list.values() if needle in x.title), key=lambda x: len(x.title))
        if found:
            return found[0]
    return None


# modules/sd_models.py:select_checkpoint (returns None instead of raising when nothing is registered)
def select_checkpoint():
    info = checkpoint_aliases.get(shared.opts.sd_model_checkpoint, None)
    if info is not None:
        return info
    return next(iter(checkpoints_list.values()), None)


checkpoint_dict_replacements_sd1 = {
    'cond_stage_model.transformer.embeddings.': 'cond_stage_model.transformer.text_model.embeddings.',
    'cond_stage_model.transformer.encoder.': 'cond_stage_model.transformer.text_model.encoder.',
    'cond_stage_model.transformer.final_layer_norm.': 'cond_stage_model.transformer.text_model.final_layer_norm.',
}  # modules/sd_models.py:checkpoint_dict_replacements_sd1 (webui's key table)

checkpoint_dict_replacements_sd2_turbo = {
    'conditioner.embedders.0.': 'cond_stage_model.',
}  # modules/sd_models.py:checkpoint_dict_replacements_sd2_turbo


# modules/sd_models.py:transform_checkpoint_dict_key
def transform_checkpoint_dict_key(k, replacements):
    for prefix, replacement in replacements.items():
        if k.startswith(prefix):
            k = replacement + k[len(prefix):]
    return k


# modules/sd_models.py:get_state_dict_from_checkpoint
def get_state_dict_from_checkpoint(pl_sd):
    pl_sd = pl_sd.pop("state_dict", pl_sd)
    pl_sd.pop("state_dict", None)
    ln = pl_sd.get('conditioner.embedders.0.model.ln_final.weight')
    table = checkpoint_dict_replacements_sd2_turbo if ln is not None and ln.size()[0] == 1024 else checkpoint_dict_replacements_sd1
    sd = {transform_checkpoint_dict_key(k, table): v for k, v in pl_sd.items()}
    pl_sd.clear()
    pl_sd.update(sd)
    return pl_sd


# modules/sd_models.py:read_state_dict (.ckpt read with torch.load(weights_only=True) instead of webui's safe unpickler)
def read_state_dict(checkpoint_file, print_global_state=False, map_location=None):
    _, extension = os.path.splitext(checkpoint_file)
    if extension.lower() == ".safetensors":
        device = map_location or shared.weight_load_location or devices.get_optimal_device_name()
        pl_sd = safetensors.torch.load_file(checkpoint_file, device=str(device))
    else:
        pl_sd = torch.load(checkpoint_file, map_location=map_location or shared.weight_load_location, weights_only=True)

    if print_global_state and "global_step" in pl_sd:
        print(f"Global Step: {pl_sd['global_step']}")

    return get_state_dict_from_checkpoint(pl_sd)


class SkipWritingToConfig:
    # modules/sd_models.py:SkipWritingToConfig
    skip = False
    previous = None

    # modules/sd_models.py:SkipWritingToConfig.__enter__
    def __enter__(self):
        self.previous = SkipWritingToConfig.skip
        SkipWritingToConfig.skip = True
        return self

    # modules/sd_models.py:SkipWritingToConfig.__exit__
    def __exit__(self, exc_type, exc_value, exc_traceback):
        SkipWritingToConfig.skip = self.previous


class _ModelData:
    # modules/sd_models.py:SdModelData (a view on shared.sd_model)
    @property
    def sd_model(self):
        return shared.sd_model

    # modules/sd_models.py:SdModelData.get_sd_model
    def get_sd_model(self):
        return shared.sd_model

    # modules/sd_models.py:SdModelData.set_sd_model
    def set_sd_model(self, v, already_loaded=False):
        shared.sd_model = v


model_data = _ModelData()


def set_model(sd_model, checkpoint_info=None):
    """test helper standing in for load_model's end: make ``sd_model`` the loaded model
    (with ``checkpoint_info`` as its checkpoint, which becomes opts.sd_model_checkpoint) and
    run the on_model_loaded callbacks.  Returns sd_model."""
    if checkpoint_info is not None:
        _attach_checkpoint(sd_model, checkpoint_info)
        shared.opts.data["sd_model_checkpoint"] = checkpoint_info.title
    shared.sd_model = sd_model
    script_callbacks.model_loaded_callback(sd_model)
    return sd_model


def _attach_checkpoint(sd_model, info):
    # the fields modules/sd_models.py:load_model_weights sets on the model
    sd_model.sd_checkpoint_info = info
    sd_model.sd_model_checkpoint = info.filename
    sd_model.sd_model_hash = info.calculate_shorthash()


# modules/sd_models.py:reload_model_weights (loading delegated to processing.switch_checkpoint_hook)
def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    checkpoint_info = info or select_checkpoint()
    current = sd_model or shared.sd_model
    if checkpoint_info is None:
        return current
    current_info = getattr(current, "sd_checkpoint_info", None)
    if current_info is not None and current_info.filename == checkpoint_info.filename and not forced_reload:
        return current

    from modules import processing
    hook = processing.switch_checkpoint_hook
    new_model = hook(checkpoint_info.title) if hook is not None else None
    if new_model is None:
        return current

    _attach_checkpoint(new_model, checkpoint_info)
    if not SkipWritingToConfig.skip:
        shared.opts.data["sd_model_checkpoint"] = checkpoint_info.title
    shared.sd_model = new_model
    script_callbacks.model_loaded_callback(new_model)
    return new_model


# modules/sd_models.py:unload_model_weights
def unload_model_weights(sd_model=None, info=None):
    return sd_model


# modules/sd_models.py:apply_token_merging
def apply_token_merging(sd_model, token_merging_ratio):
    pass


class FakeSdModel:
    # ldm/models/diffusion/ddpm.py:LatentDiffusion (sgm DiffusionEngine for SDXL) as modules/sd_models.py:load_model leaves it
    """Wraps a test model ``inner`` (anything with ``.model.diffusion_model(x, timesteps, context=, y=)``
    and ``get_learned_conditioning(list_of_str)`` returning (B, 77, C) or, SDXL-style, a dict
    {"crossattn", "vector"}).  Attributes not defined here are read from ``inner``.

    Adds what webui's loaded model has: cond_stage_key, model.conditioning_key ("crossattn";
    "hybrid" for a 9-input-channel UNet), is_sdxl/is_sd1/..., latent_channels, parameterization,
    sd_checkpoint_info/sd_model_hash/sd_model_checkpoint, cond_stage_model_empty_prompt
    ((1, 77, C), the conditioning of ""), ema_scope(), apply_model(x, t, cond_dict) and
    get_learned_conditioning with webui's prompt chunking: a prompt of more than 75 words
    (the test tokenizers' tokens) gives 154, 231, ... tokens, shorter rows of the batch are
    padded with empty chunks; an SDXL negative batch of only "" is zeroed like webui does.
    """

    # fake-only: wraps a test model (see the class docstring)
    def __init__(self, inner, checkpoint_info=None, *, cond_stage_key="txt", conditioning_key=None, chunk_length=75):
        d = self.__dict__
        d["inner"] = inner
        self.is_sdxl = hasattr(inner, "conditioner")
        self.is_sd1 = not self.is_sdxl
        self.is_sd2 = False
        self.is_sd3 = False
        self.is_ssd = False
        self.chunk_length = chunk_length
        self.cond_stage_key = cond_stage_key
        self.parameterization = "eps"
        self.latent_channels = 4
        self.lowvram = False
        self.used_config = None
        in_channels = getattr(inner.model.diffusion_model, "in_channels", 4)
        self.is_sdxl_inpaint = self.is_sdxl and in_channels == 9
        if conditioning_key is None:
            conditioning_key = getattr(inner.model, "conditioning_key", None) or ("hybrid" if in_channels == 9 and not self.is_sdxl else "crossattn")
        inner.model.conditioning_key = conditioning_key
        self.sd_checkpoint_info = None
        self.sd_model_checkpoint = None
        self.sd_model_hash = None
        if checkpoint_info is not None:
            _attach_checkpoint(self, checkpoint_info)
        with torch.no_grad():
            empty = self.get_learned_conditioning([""])
        self.cond_stage_model_empty_prompt = empty["crossattn"] if isinstance(empty, dict) else empty

    # fake-only: everything else is the wrapped model's
    def __getattr__(self, name):
        return getattr(self.__dict__["inner"], name)

    @contextlib.contextmanager
    def ema_scope(self, context=None):
        # ldm/models/diffusion/ddpm.py:DDPM.ema_scope (no EMA weights here)
        yield None

    # sgm/ldm get_learned_conditioning of one 77-token chunk
    def _encode(self, texts, batch):
        if self.is_sdxl:
            return self.inner.get_learned_conditioning(list(texts), width=getattr(batch, "width", None) or 1024,
                                                       height=getattr(batch, "height", None) or 1024)
        return self.inner.get_learned_conditioning(list(texts))

    # modules/sd_hijack_clip.py:FrozenCLIPEmbedderWithCustomWordsBase.forward (chunking) via LatentDiffusion.get_learned_conditioning
    def get_learned_conditioning(self, c):
        words = [str(text).split() for text in c]
        n_chunks = max([max(1, math.ceil(len(w) / self.chunk_length)) for w in words] or [1])
        parts = []
        for j in range(n_chunks):
            texts = [" ".join(w[j * self.chunk_length:(j + 1) * self.chunk_length]) for w in words]
            parts.append(self._encode(texts, c))
        if isinstance(parts[0], dict):
            res = dict(parts[0])
            res["crossattn"] = torch.cat([p["crossattn"] for p in parts], dim=1)
            if getattr(c, "is_negative_prompt", False) and all(text == "" for text in c):
                res["crossattn"] = torch.zeros_like(res["crossattn"])
                pooled = self._pooled_width(res["vector"])
                res["vector"] = torch.cat([torch.zeros_like(res["vector"][:, :pooled]), res["vector"][:, pooled:]], dim=1)
            return res
        return torch.cat(parts, dim=1)

    def _pooled_width(self, vector):
        # sgm GeneralConditioner layout: [pooled text embedding | size embeddings of width 2*outdim each]
        embedders = getattr(getattr(self.inner, "conditioner", None), "embedders", [])
        size_width = sum(2 * e.outdim for e in embedders if hasattr(e, "outdim"))
        return vector.shape[1] - size_width

    # ldm/models/diffusion/ddpm.py:LatentDiffusion.apply_model (+ DiffusionWrapper.forward; sd_models_xl.py:apply_model)
    def apply_model(self, x, t, cond):
        unet = self.inner.model.diffusion_model
        if not isinstance(cond, dict):
            cond = {"c_concat" if self.inner.model.conditioning_key == "concat" else "c_crossattn": [cond]}
        if "c_crossattn" in cond:
            key = self.inner.model.conditioning_key
            context = torch.cat(cond["c_crossattn"], 1)
            if key in ("hybrid", "concat"):
                x = torch.cat([x] + list(cond["c_concat"]), dim=1)
            if key == "crossattn-adm":
                return unet(x, t, context=context, y=cond["c_adm"])
            return unet(x, t, context=context)
        if self.is_sdxl_inpaint:
            x = torch.cat([x] + list(cond["c_concat"]), dim=1)
        return unet(x, t, context=cond.get("crossattn"), y=cond.get("vector"))
