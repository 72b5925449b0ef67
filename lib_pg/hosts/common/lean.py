"""Lean weak weights as the front end sees them: exact or lean within which
budget, the cache file under the models folder, and factoring with the
front end's progress bar and Interrupt (the factoring itself is lib_pg.lowrank)."""

import os
import sys

from lib_pg import checkpoints, lowrank
from lib_pg.errors import PGError
from lib_pg.inspector import Progress
from lib_pg.lean_plan import (GPU_MARGIN_BYTES, GPU_MARGIN_SHARE, LEAN_CACHE_FOLDER, WeightsPlan,  # noqa: F401 (shared)
                              lean_dtype, lean_file_name, weights_plan)

import torch

from modules import devices, sd_models, shared  # noqa: E402


def active_file(model):
    info = getattr(model, "sd_checkpoint_info", None)
    if info is None or not os.path.isfile(info.filename):
        raise PGError("lean weak weights need the active model's checkpoint file")
    return info.filename


def file_hash(info):
    """webui's sha256 of a checkpoint (computed once and kept in webui's hash cache)."""
    if not getattr(info, "sha256", None):
        info.calculate_shorthash()
    return info.sha256


def lean_cache_folder():
    """PG's own folder under webui's models folder (next to Stable-diffusion/)."""
    return os.path.join(os.path.dirname(os.path.abspath(sd_models.model_path)), LEAN_CACHE_FOLDER)


def lean_cache_path(active_info, base_info, budget_bytes, dtype, part=""):
    """One file per (active hash, base hash, budget, dtype[, part of the model]): reused across restarts."""
    return os.path.join(lean_cache_folder(), lean_file_name(file_hash(active_info), file_hash(base_info), budget_bytes, dtype, part))


def factor_with_progress(active_path, base_path, budget_bytes, dtype, part=None):
    """Factor on the compute device (the GPU when there is one), with the
    front end's progress bar and a console one; Interrupt stops it between tensors.
    `part(checkpoint)`, where given, narrows both files to the part factored (the forks: the UNet)."""
    device = devices.device if devices.device.type == "cuda" else devices.cpu
    state = shared.state
    state.textinfo = "Personalization Guidance: factoring the weak weights"
    bar = None

    def progress(done, total):
        nonlocal bar
        if bar is None:
            bar = Progress("[Personalization Guidance] factoring the weak weights", total, sys.stdout, min_total=0)
        bar.advance(done - bar.done)
        state.sampling_step, state.sampling_steps = int(100 * done / max(total, 1)), 100

    def should_stop():
        return bool(state.interrupted or getattr(state, "stopping_generation", False))

    try:
        with checkpoints.open_checkpoint(active_path, "active checkpoint") as active, \
                checkpoints.open_checkpoint(base_path, "base checkpoint") as base:
            if part is not None:
                active, base = part(active), part(base)
            return lowrank.factor_pair(active, base, budget_bytes, dtype, device, progress, should_stop)
    except lowrank.FactoringInterrupted:
        raise PGError("interrupted while factoring the weak weights (nothing was cached)") from None
    finally:
        if bar is not None:
            bar.finish()
        state.sampling_step, state.sampling_steps = 0, 0
        state.textinfo = None
