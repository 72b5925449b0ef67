"""Which checkpoint files a ComfyUI MODEL and its base are (for "Automatic" and lean weights).

A ComfyUI MODEL does not say which file it was loaded from (comfy/sd.py
load_checkpoint_guess_config keeps no path). PG finds it by its weights: the
same fixed sample of UNet tensors that automatic base detection reads from each
file (lib_pg.checkpoints.fingerprint, ~0.25 MB per file, cached), taken from the
model's unpatched weights (its LoRA patches left out) and compared with each
listed checkpoint, the file's values rounded to the model's dtype as ComfyUI's
loader rounds them. The file the model was loaded from is at distance 0; the
base is the nearest other file, within lib_pg.checkpoints.MAX_BASE_DISTANCE
(as webui's Automatic base).
"""

import hashlib
import os
import threading

import numpy as np
import torch

from lib_pg import checkpoints
from lib_pg.checkpoints import FINGERPRINT_RUN_LENGTH, FINGERPRINT_RUNS, FINGERPRINT_UNET_KEYS, MAX_BASE_DISTANCE
from lib_pg.errors import PGError
from lib_pg.weights import UNET_PREFIX

from lib_pg.hosts.comfyui.patchers import original_weight

import folder_paths

# At most this far (relative) is a file the model's own: the same values, rounded to the model's dtype.
SAME_FILE_DISTANCE = 1e-6
FINGERPRINTS = checkpoints.FingerprintCache()
_HASHES = {}
_HASH_LOCK = threading.Lock()


def listed_checkpoints():
    """(name, full path) of every file in ComfyUI's checkpoints folders."""
    out = []
    for name in folder_paths.get_filename_list("checkpoints"):
        try:
            out.append((name, folder_paths.get_full_path_or_raise("checkpoints", name)))
        except FileNotFoundError:
            continue
    return out


def model_samples(patcher):
    """{file key: (float32 numpy sample, shape)} of the model's unpatched UNet weights, for the same
    keys and elements a file fingerprint reads (lib_pg.checkpoints.fingerprint_keys / read_sample)."""
    params = dict(patcher.model.named_parameters())
    shapes = {"model." + k: tuple(p.shape) for k, p in params.items() if k.startswith("diffusion_model.")}
    dtypes = {k: params[k[len("model."):]].dtype for k in shapes}
    keys = [k for k in checkpoints.fingerprint_keys(shapes, dtypes) if k.startswith(UNET_PREFIX)][:FINGERPRINT_UNET_KEYS]
    out = {}
    for key in keys:
        flat = original_weight(patcher, key[len("model."):]).detach().reshape(-1)
        runs = checkpoints._runs(flat.numel(), FINGERPRINT_RUNS, FINGERPRINT_RUN_LENGTH)
        out[key] = (torch.cat([flat[s:s + n] for s, n in runs]).float().cpu().numpy(), shapes[key])
    return out, next(iter(params.values())).dtype


def distance(samples, dtype, fp):
    """Mean relative distance ‖model − file‖ / ‖file‖ over the sampled UNet tensors (inf: not comparable)."""
    ratios = []
    for key, (values, shape) in samples.items():
        other = fp.samples.get(key)
        if other is None or tuple(fp.shapes.get(key, ())) != tuple(shape) or other.shape != values.shape:
            continue
        file_values = torch.from_numpy(np.ascontiguousarray(other)).to(dtype).double().numpy()
        norm = float(np.linalg.norm(file_values))
        diff = float(np.linalg.norm(values.astype(np.float64) - file_values))
        ratios.append(diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf")))
    if not ratios or 2 * len(ratios) < len(samples):  # another architecture (or key layout)
        return float("inf")
    return float(np.mean(ratios))


def ranking(patcher):
    """[(name, path, distance)] of the listed checkpoints comparable with the model, nearest first."""
    samples, dtype = model_samples(patcher)
    out = []
    for name, path in listed_checkpoints():
        try:
            fp = FINGERPRINTS.get(path)
        except (PGError, OSError):
            continue
        if fp.is_lora:
            continue
        d = distance(samples, dtype, fp)
        if d != float("inf"):
            out.append((name, path, d))
    out.sort(key=lambda item: item[2])
    return out


def model_file(patcher, ranked=None):
    """(name, path) of the listed checkpoint the model was loaded from, or None."""
    ranked = ranking(patcher) if ranked is None else ranked
    if ranked and ranked[0][2] <= SAME_FILE_DISTANCE:
        return ranked[0][:2]
    return None


def automatic_base(patcher):
    """(name, path, distance) of the listed checkpoint nearest the model's UNet, the model's own file
    left out; PGError when none is plausible (as webui's Automatic base)."""
    ranked = ranking(patcher)
    others = [item for item in ranked if item[2] > SAME_FILE_DISTANCE]
    if not others:
        raise PGError("Automatic base: no other checkpoint of the model's architecture (same UNet keys and shapes) in "
                      "ComfyUI's checkpoints folder: pick the base checkpoint by hand or connect reference_model")
    name, path, d = others[0]
    if d > MAX_BASE_DISTANCE:
        raise PGError(f"Automatic base: no plausible base in the checkpoints folder: the closest, '{name}', differs by {d:.2f} "
                      f"(relative; a fine-tune of its base is well under {MAX_BASE_DISTANCE}, unrelated models about 1.4): "
                      "pick the base checkpoint by hand")
    return name, path, d


def sha256(path):
    """The file's full sha256 (as webui's hash, so lean cache files are shared), kept per (path, size, mtime)."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    with _HASH_LOCK:
        if key in _HASHES:
            return _HASHES[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    with _HASH_LOCK:
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]
