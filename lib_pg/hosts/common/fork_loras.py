"""LoRAs on the Forge-family hosts (Forge, reForge): the reference weights from the host's own patches.

Host-free (torch only). Both forks apply a prompt's LoRAs as *patches* on their model patchers
(one for the UNet, one for the text encoder): lists of entries per parameter key, merged into the
weights by the host's own function when it loads the model for sampling (Forge
backend/patcher/lora.py LoraLoader.refresh, reForge ldm_patched/modules/model_patcher.py
patch_weight_to_device), with the weight before any LoRA kept in the host's backup. PG never
touches those lists or the backup. It reads them, and computes with the host's own merge:

- the live weights as the host will have them once it loaded the model (the merge of every entry
  onto the original weight): at the time PG builds its weak weights (before sampling), the host
  may not have merged this prompt's LoRAs yet, or may still hold the previous prompt's;
- the reference: the merge of the reference entries (the stripped LoRAs' entries removed) onto
  the original weight, or onto the base checkpoint's tensor. That is, bit for bit on the same
  device, what the host computes for the prompt without the stripped LoRAs, or for the base
  checkpoint with the same LoRAs.

Each fork's controller says, per patcher, which entries the reference keeps and how the host
merges (lib_pg/hosts/forge, lib_pg/hosts/reforge); the weak model is then built from (reference,
live) as from a base checkpoint (lib_pg/hosts/common/forks.py). Design and fork file:line:
docs/FORKS.md, "LoRAs on the forks".

In LoRA mode without a base checkpoint, a layer whose weight differs only by stripped *plain*
LoRAs (`low_rank_corrections`) gets no copy: as on webui, it runs once over every row and the
weak rows get (ω − 1)·strength·(alpha/rank)·up(down(x)) added, the host's merged delta applied
in low-rank form.
"""

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lib_pg.errors import PGError
from lib_pg.lowrank import torch_correctable
from lib_pg.weights import LowRankDelta, aligned, live_parameters

# Whether LoRA mode uses low-rank corrections where they are exact (tests turn it off to compare
# with the copy path, the fork's own merge).
LOW_RANK = True


@dataclass
class PatcherLoras:
    """One host patcher (the UNet's or the text encoder's) and its LoRA patches.

    `model` is the module the patch keys are relative to; `live` maps a patch key to the host's
    entries in merge order, `reference` to the entries the reference keeps (a key missing there
    keeps none); `original(key)` is the weight before any LoRA (the host's backup, else the
    parameter); `merge(entries, weight, key)` is the host's own merge, returning a new tensor in
    weight's dtype (weight itself is not changed); `backed_up` are the keys the host holds an
    original for (their parameter may hold an older merge)."""

    model: torch.nn.Module
    live: dict
    reference: dict
    original: object
    merge: object
    backed_up: frozenset = field(default_factory=frozenset)


def patch_keys(view: torch.nn.Module, patchers):
    """checkpoint key (the view's names) -> (patcher, patch key) for every parameter of the view
    that a patcher's model holds (matched by module identity: the view and the host's patcher
    models share their modules)."""
    prefixes = []
    for patcher in patchers:
        prefixes.append({id(module): name for name, module in patcher.model.named_modules()})
    found = {}
    for key, (module, name, _param) in live_parameters(view).items():
        for patcher, names in zip(patchers, prefixes):
            prefix = names.get(id(module))
            if prefix is not None:
                found[key] = (patcher, f"{prefix}.{name}" if prefix else name)
                break
    return found


def _merged(patcher, entries, weight, key):
    if not entries:
        return weight
    return patcher.merge(list(entries), weight, key)


def reference_weights(view: torch.nn.Module, patchers, base_state=None, skip=()):
    """(live_state, ref_state), both keyed by the view's checkpoint keys.

    live_state: for every parameter the host has patches or a backup for, the weight it computes
    with during sampling (the merge of its entries onto the original).
    ref_state: for every parameter a LoRA patches, the reference weight: the merge of the entries
    the reference keeps onto the original (base_state None) or onto base_state[key] in the live
    dtype. Keys no LoRA patches keep the base's tensor (or the original) as they are; keys in
    `skip` (low-rank corrections stand for them) get no reference.
    Tensors are in the live parameter's dtype, on the original's device."""
    owners = live_parameters(view)
    live_state, ref_state = {}, {}
    with torch.no_grad():
        for key, (patcher, pkey) in patch_keys(view, patchers).items():
            entries = patcher.live.get(pkey)
            if not entries and pkey not in patcher.backed_up:
                continue
            param = owners[key][2]
            original = patcher.original(pkey)
            live_state[key] = aligned(_merged(patcher, entries, original, pkey).detach())
            if not entries or key in skip:
                continue
            if base_state is None:
                start = original
            elif key not in base_state or tuple(base_state[key].shape) != tuple(param.shape):
                continue  # a base of another architecture: build_weak_model names the mismatch
            else:
                start = base_state[key]
                if start.dtype != param.dtype or start.device != original.device:
                    start = start.to(device=original.device, dtype=param.dtype)
                start = aligned(start)
            ref_state[key] = aligned(_merged(patcher, patcher.reference.get(pkey, ()), start, pkey).detach())
    return live_state, ref_state


def without_loras_state(view: torch.nn.Module, live_state, ref_state):
    """The reference state of the LoRA mode (no base checkpoint): every parameter of the view at
    its final live value, the LoRA-patched ones at their reference (the weak model then differs
    exactly where a stripped LoRA does)."""
    state = {}
    for key, (_module, _name, param) in live_parameters(view).items():
        state[key] = ref_state.get(key, live_state.get(key, param.detach()))
    return state


def originals_fingerprint(view: torch.nn.Module, patchers) -> int:
    """Identity of the weights under the LoRAs (the host's originals, else the parameters): their
    storage and in-place version. What the weak weights depend on besides the patches, and stable
    while the host merges and unmerges (a merge replaces the parameter and keeps the original, the
    same tensor, as its backup)."""
    keys = patch_keys(view, patchers)
    parts = []
    for key, (_module, _name, param) in live_parameters(view).items():
        patcher, pkey = keys.get(key, (None, None))
        tensor = patcher.original(pkey) if patcher is not None and pkey in patcher.backed_up else param
        try:
            version = tensor._version  # bumped by an in-place change
        except RuntimeError:  # inference tensors carry no version counter
            version = None
        parts.append((key, tensor.data_ptr(), tuple(tensor.shape), str(tensor.dtype), version))
    return hash(tuple(parts))


def strips_anything(patchers) -> bool:
    """Whether the reference leaves out any entry (a stripped LoRA the host applied)."""
    return any(len(patcher.reference.get(key, ())) != len(entries) for patcher in patchers for key, entries in patcher.live.items())


# -- low-rank corrections (LoRA mode without a base checkpoint) ------------------------------------

def plain_lora(entry):
    """(strength, up, down, alpha) of a host patch entry that is a plain LoRA applied additively,
    else None. Entries are (strength_patch, v, strength_model, offset, function) on both forks;
    v is Forge's ("lora", (up, down, alpha, mid, dora_scale)) (backend/patcher/lora.py
    merge_lora_to_weight), reForge's LoRAAdapter with .weights (up, down, alpha, mid, dora_scale,
    reshape) (ldm_patched/modules/weight_adapter/lora.py calculate_weight) or its older ("lora", v)
    tuple. Not plain: a LoCon mid (CP), DoRA, a reshape (pad), strength_model != 1 (it scales the
    whole weight), an offset (a slice of the weight) or a function."""
    if len(entry) < 5:
        return None
    strength, v, strength_model, offset, function = entry[:5]
    if strength_model != 1.0 or offset is not None or function is not None:
        return None
    if isinstance(v, tuple) and len(v) == 2 and v[0] == "lora":
        weights = v[1]
    elif type(v).__name__ == "LoRAAdapter" and getattr(v, "name", None) == "lora":
        weights = getattr(v, "weights", None)
    else:
        return None
    if not isinstance(weights, (tuple, list)) or len(weights) < 3:
        return None
    up, down, alpha = weights[0], weights[1], weights[2]
    if any(extra is not None for extra in weights[3:6]):  # mid, dora_scale, reshape
        return None
    if not isinstance(up, torch.Tensor) or not isinstance(down, torch.Tensor) or up.dim() < 2 or down.dim() < 2:
        return None
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.item()
    return float(strength), up, down, alpha


def _additive(entry, shape) -> bool:
    """An entry whose delta does not depend on the weight it is merged onto: a plain LoRA, or a
    "diff" of the weight's shape (strength_model 1, no offset, no function)."""
    if plain_lora(entry) is not None:
        return True
    if len(entry) < 5:
        return False
    _strength, v, strength_model, offset, function = entry[:5]
    if strength_model != 1.0 or offset is not None or function is not None:
        return False
    if not (isinstance(v, tuple) and len(v) == 2 and v[0] == "diff"):
        return False
    diff = v[1]
    if len(diff) > 1 and isinstance(diff[1], dict) and diff[1].get("pad_weight"):
        return False
    return isinstance(diff[0], torch.Tensor) and tuple(diff[0].shape) == tuple(shape)


def _layer_form(module, weight):
    """"linear" or "conv" where the layer computes F.linear / F.conv2d of its weight (torch's
    classes, and the forks' own: Forge's ForgeOperations.Linear is a plain nn.Module), else None."""
    if isinstance(module, torch.nn.Conv2d):
        if weight.dim() == 4 and module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str):
            return "conv"
        return None
    if weight.dim() == 2 and (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Linear"):
        return "linear"
    return None


def correctable_layer(module):
    """Whether lean corrections (D·x added to the layer's output) stand for a weight change of this
    layer: torch's own classes (lib_pg.lowrank), and the forks' Linear/Conv2d classes, which
    compute F.linear / F.conv2d of their weight (Forge backend/operations.py ForgeOperations.Linear,
    a plain nn.Module; reForge ldm_patched/modules/ops.py disable_weight_init.Linear, an nn.Linear
    subclass)."""
    if torch_correctable(module):
        return True
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and _layer_form(module, weight) is not None


class _Factors:
    """A LoRA's factors for one layer, kept in the layer's dtype; moved (not duplicated) to the
    device and dtype of the rows they are applied to."""

    def __init__(self, down, up):
        self.down, self.up = down, up

    def like(self, x):
        if self.down.device != x.device or self.down.dtype != x.dtype:
            self.down = self.down.to(device=x.device, dtype=x.dtype)
            self.up = self.up.to(device=x.device, dtype=x.dtype)
        return self.down, self.up


def lora_correction(module, weight, strength, up, down, alpha):
    """The LowRankDelta of one plain LoRA entry on `module` (whose weight is `weight`), equal to
    the host's merged delta (strength * alpha / rank) * (up.flatten(1) @ down.flatten(1)) reshaped
    to the weight, applied to the input instead: Linear x -> up(down(x)); Conv2d the k×k down with
    the layer's stride/padding/dilation, then the 1×1 up. None where that form does not exist."""
    form = _layer_form(module, weight)
    if form is None:
        return None
    rank = down.shape[0]
    out_features, fan_in = weight.shape[0], weight[0].numel()
    if tuple(up.flatten(1).shape) != (out_features, rank) or tuple(down.flatten(1).shape) != (rank, fan_in):
        return None  # the host would reshape/pad: not this form
    scale = strength * (alpha / rank if alpha is not None else 1.0)
    with torch.no_grad():
        held_down = down.detach().flatten(1).to(device=weight.device, dtype=weight.dtype, copy=True)
        held_up = up.detach().flatten(1).to(device=weight.device, dtype=weight.dtype, copy=True)
    if form == "conv":
        held_down = held_down.reshape(rank, *weight.shape[1:])
        held_up = held_up.reshape(out_features, rank, 1, 1)
    factors = _Factors(held_down, held_up)
    stride, padding, dilation = (module.stride, module.padding, module.dilation) if form == "conv" else (None, None, None)

    def output(x):
        d, u = factors.like(x)
        if form == "conv":
            y = F.conv2d(F.conv2d(x, d, None, stride, padding, dilation), u)
        else:
            y = F.linear(F.linear(x, d), u)
        return y * scale

    def merged_delta():  # from the held factors: the host's own tensors are not kept alive
        return (scale * torch.mm(factors.up.float().flatten(1), factors.down.float().flatten(1))).reshape(shape)

    shape = weight.shape
    host_bytes = up.numel() * up.element_size() + down.numel() * down.element_size()
    held_bytes = held_down.numel() * held_down.element_size() + held_up.numel() * held_up.element_size()
    return LowRankDelta(output=output, weight=merged_delta, nbytes=host_bytes, held_bytes=held_bytes)


def _stripped_entries(live, kept):
    """The live entries the reference leaves out (by identity: the reference's entries are the
    host's own objects)."""
    left = Counter(id(entry) for entry in kept)
    stripped = []
    for entry in live:
        if left[id(entry)]:
            left[id(entry)] -= 1
        else:
            stripped.append(entry)
    return stripped


def low_rank_corrections(view: torch.nn.Module, patchers):
    """({module: [LowRankDelta]}, {module: the checkpoint key it stands for}) of the LoRA mode without a base
    checkpoint: the layers where the weak weight differs only by stripped plain LoRAs, exactly
    (up to float rounding) as the host merges them. A layer qualifies when its weight is its only
    patched parameter, every entry on it (kept or stripped) is additive (`_additive`: the live and
    reference merges then differ by the stripped deltas alone), every stripped entry is a plain
    LoRA (`plain_lora`) and the layer computes a Linear or Conv2d of its weight. Everything else
    (LoHa, LoKr, DoRA, a LoCon mid, a bias or norm patch, ...) keeps the copy path."""
    if not LOW_RANK:
        return {}, {}
    owners = live_parameters(view)
    by_module = {}
    for key, (patcher, pkey) in patch_keys(view, patchers).items():
        module, name, param = owners[key]
        if patcher.live.get(pkey):
            by_module.setdefault(id(module), (module, []))[1].append((key, name, param, patcher, pkey))
    corrections, keys = {}, {}
    for module, patched in by_module.values():
        if len(patched) != 1 or patched[0][1] != "weight":
            continue
        key, _name, param, patcher, pkey = patched[0]
        entries = patcher.live[pkey]
        stripped = _stripped_entries(entries, patcher.reference.get(pkey, ()))
        if not stripped or not all(_additive(entry, param.shape) for entry in entries):
            continue
        deltas = []
        for entry in stripped:
            lora = plain_lora(entry)
            if lora is None:
                break
            if lora[0] == 0.0:
                continue  # merges nothing
            delta = lora_correction(module, param, *lora)
            if delta is None:
                break
            deltas.append(delta)
        else:
            if deltas:
                corrections[module] = deltas
                keys[module] = key
    return corrections, keys


def split_patches_by_lora(patches, original_patches, counted, index, stripped_files, host):
    """(live, reference) patch lists per key of a patcher whose lists name no LoRA (reForge, Neo):
    a key's entries are the original patcher's own, then each LoRA's in load order, `counted` giving
    how many each LoRA file added (per patcher `index`). The reference keeps all but the stripped
    files' entries; a count that does not add up stops the generation rather than guess."""
    live, reference = {}, {}
    for key in set(patches) | {k for _file, counts in counted for k in counts[index]}:
        entries = list(patches.get(key, ()))
        position = len(original_patches.get(key, ()))
        kept = entries[:position]
        for filename, counts in counted:
            n = counts[index].get(key, 0)
            if filename not in stripped_files:
                kept += entries[position:position + n]
            position += n
        if position != len(entries):
            raise PGError(f"{host}'s LoRA patches of {key} ({len(entries)}) do not match the prompt's LoRAs "
                          f"({position}): another extension changed them, so PG cannot tell the LoRAs apart")
        if entries:
            live[key], reference[key] = entries, kept
    return live, reference
