"""Exact or lean weak weights, and the lean cache file's name: the pure part every host shares
(webui and the forks through lib_pg.hosts.common.lean, ComfyUI through lib_pg.hosts.comfyui).

One format on every host: a cache file written by one is read by another for the same
(active file, base file, budget, dtype[, part]); the hashes are the files' full sha256."""

import math

import torch

from lib_pg import lowrank
from lib_pg.weights import UNET_PREFIX

# The GPU memory automatic mode leaves free for sampling (activations, VAE decode).
GPU_MARGIN_BYTES = 2 * 2**30
GPU_MARGIN_SHARE = 0.15
LEAN_CACHE_FOLDER = "PersonalizationGuidance"  # under the host's models folder


class WeightsPlan:
    """Exact copies (lean_budget None) or lean factors within lean_budget bytes."""

    def __init__(self, lean_budget=None):
        self.lean_budget = lean_budget

    @property
    def key(self):
        return ("lean", self.lean_budget) if self.lean_budget is not None else ("exact",)


def weights_plan(settings, exact_bytes, available_bytes):
    """Exact where they fit: a forced lean budget no smaller than the exact
    copy gets the exact copy (exact mode's result, bit for bit); automatic
    mode takes the exact copy within the memory available (None: no limit),
    else lean factors within the lean budget, at most what is available."""
    requested = int(settings.lean_budget_mb * 2**20) if settings.lean_budget_mb else lowrank.default_budget(exact_bytes)
    if settings.weights == "lean":
        return WeightsPlan() if requested >= exact_bytes else WeightsPlan(requested)
    if available_bytes is None or exact_bytes <= available_bytes:
        return WeightsPlan()
    if requested <= available_bytes:
        return WeightsPlan(requested)
    # Free memory moves a little between generations: a power of two MiB keeps
    # the budget (and so the cached factors) the same across them.
    return WeightsPlan(2 ** max(int(math.log2(max(available_bytes, 2**20))), 20))


def gpu_available_bytes(free_bytes, total_bytes, held_bytes=0):
    """What automatic mode may spend on a GPU: its free memory plus what the kept weak weights hold,
    less a margin for sampling."""
    return max(free_bytes + held_bytes - max(GPU_MARGIN_BYTES, int(GPU_MARGIN_SHARE * total_bytes)), 0)


def lean_dtype(live_dtype):
    """Factors are stored in the live dtype; fp8 weight storage keeps them in fp16."""
    return live_dtype if live_dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float16


def lean_file_name(active_sha256, base_sha256, budget_bytes, dtype, part=""):
    """One file per (active hash, base hash, budget, dtype[, part of the model]): reused across restarts."""
    return (f"lean-{active_sha256[:12]}-{base_sha256[:12]}-{budget_bytes}B-"
            f"{str(dtype).replace('torch.', '')}{'-' + part if part else ''}.safetensors")


class UNetPart:
    """A `Checkpoint` seen as its UNet tensors only (lean factors on the forks and ComfyUI cover the
    UNet, whose keys are the same in the file and the host)."""

    def __init__(self, checkpoint):
        self._checkpoint = checkpoint
        self.keys = [k for k in checkpoint.keys if k.startswith(UNET_PREFIX)]

    def __contains__(self, key):
        return key.startswith(UNET_PREFIX) and key in self._checkpoint

    def __getattr__(self, name):
        return getattr(self._checkpoint, name)
