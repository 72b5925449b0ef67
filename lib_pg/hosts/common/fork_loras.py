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
"""

from dataclasses import dataclass, field

import torch

from lib_pg.weights import aligned, live_parameters


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


def reference_weights(view: torch.nn.Module, patchers, base_state=None):
    """(live_state, ref_state), both keyed by the view's checkpoint keys.

    live_state: for every parameter the host has patches or a backup for, the weight it computes
    with during sampling (the merge of its entries onto the original).
    ref_state: for every parameter a LoRA patches, the reference weight: the merge of the entries
    the reference keeps onto the original (base_state None) or onto base_state[key] in the live
    dtype. Keys no LoRA patches keep the base's tensor (or the original) as they are.
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
            if not entries:
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
