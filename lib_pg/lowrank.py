"""Lean weak weights: the fine-tune's difference D = θ_live − θ_ref as low-rank factors.

Exact mode keeps one copy of every weight that differs. Lean mode keeps, per
layer, D ≈ up·down (Linear; a 3×3 conv in the LoCon form: a k×k `down` conv to
r channels, a 1×1 `up` conv), and the weak rows compute
W_live·x − (1 − ω)·up(down(x)) in the same UNet call (the LoRA mode's
correction path). The ranks come from one memory budget for the whole model:
every layer's singular values are ranked by captured energy (s²) per byte and
taken greedily until the budget is spent; a tensor that cannot be factored
(norms, biases, embeddings) competes as one item of its whole energy and size,
and a layer whose factors would cost as much as its exact copy is copied.

Pure torch + safetensors (never imports webui). Reads go through
`lib_pg.checkpoints.Checkpoint`, one tensor pair at a time.
"""

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lib_pg.errors import PGError
from lib_pg.weights import TEXT_PREFIXES, UNET_PREFIX, WeakLayer, WeakModel, detect_family, interpolate, live_parameters

# The default lean budget, as a share of the bytes of the weights that differ:
# the weak weights then cost at most a tenth of the UNet (bench: lean_extra_mem_ratio).
DEFAULT_BUDGET_SHARE = 0.08
# No layer gets more than this rank: beyond it a copy is rarely dearer, and
# a randomized SVD of this rank is what the factoring can afford on a CPU.
MAX_RANK = 256
# Matrices whose smaller side is at most this get a full SVD (cheap, exact);
# larger ones a randomized SVD of rank MAX_RANK (+ oversampling).
FULL_SVD_MAX_SIDE = 2 * MAX_RANK
OVERSAMPLE = 16
SINGLE_THREAD_MAX_SIDE = 256
# Factoring holds at most about twice the budget (float32) plus this before it
# drops what can no longer be taken.
PRUNE_SLACK = 64 * 2**20

# Key prefix for differences a kohya/LyCORIS loader cannot express (embeddings,
# OpenCLIP's fused attention, a bias whose weight is the same): webui leaves
# keys it cannot match alone, PG reads them.
PG_EXACT = "pg_exact."
METADATA_KEY = "pg_lean"


class FactoringInterrupted(PGError):
    def __init__(self):
        super().__init__("factoring the weak weights was interrupted")


# ---------------------------------------------------------------------------
# which tensors factor, and their names in a kohya LoRA file
# ---------------------------------------------------------------------------

def module_prefix(key: str):
    """(module prefix, parameter name) of a checkpoint key."""
    prefix, _, name = key.rpartition(".")
    return prefix, name


def is_embedding(prefix: str) -> bool:
    return prefix.endswith(("embedding", "token_embedding", "position_embedding"))


def is_factorable(key: str, shape, keys=()) -> bool:
    """A Linear or Conv2d weight whose forward PG (and webui's Lora) can wrap:
    not an embedding table, not an attention projection fused into
    nn.MultiheadAttention (its forward never calls out_proj's)."""
    prefix, name = module_prefix(key)
    if name != "weight" or len(shape) not in (2, 4) or is_embedding(prefix):
        return False
    parent = prefix.rpartition(".")[0]
    return f"{parent}.in_proj_weight" not in keys


_SD1_TE = "cond_stage_model.transformer.text_model."
_SDXL_TE1 = "conditioner.embedders.0.transformer.text_model."
_OPENCLIP_TE = ("cond_stage_model.model.transformer.resblocks.", "conditioner.embedders.1.model.transformer.resblocks.")


def _openclip_layer(rest: str) -> str:
    """OpenCLIP resblock child as kohya's diffusers-style name (webui maps it back)."""
    index, _, child = rest.partition(".")
    child = child.replace("mlp.c_fc", "mlp.fc1").replace("mlp.c_proj", "mlp.fc2").replace(".", "_")
    return f"text_model_encoder_layers_{index}_{child}"


def lora_name(prefix: str):
    """The kohya LoRA name of a module (checkpoint key prefix), in a form webui
    1.10.1's Lora extension maps back to that module (networks.py
    convert_diffusers_name_to_compvis and its compvis fall-backs); None where
    no LoRA name reaches it."""
    if prefix.startswith(UNET_PREFIX):
        return "lora_unet_" + prefix[len(UNET_PREFIX):].replace(".", "_")
    if prefix.startswith(_SD1_TE):
        rest = prefix[len(_SD1_TE):].replace(".", "_")
        return ("lora_te_text_model_" if rest.startswith("encoder_layers_") else "lora_te1_text_model_") + rest
    if prefix.startswith(_SDXL_TE1):
        return "lora_te1_text_model_" + prefix[len(_SDXL_TE1):].replace(".", "_")
    for head, lora in zip(_OPENCLIP_TE, ("lora_te_", "lora_te2_")):
        if prefix.startswith(head):
            return lora + _openclip_layer(prefix[len(head):])
    return None


# ---------------------------------------------------------------------------
# factoring one matrix
# ---------------------------------------------------------------------------

def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """(out, in·k·k): a conv kernel as the matrix its LoCon factors multiply out to."""
    return weight.reshape(weight.shape[0], -1)


def truncated_svd(matrix: torch.Tensor, rank: int, seed: int = 0):
    """(U, s, Vh) of the `rank` largest singular values, float32, on the matrix's
    device. Small matrices: exactly (an SVD on a GPU; on a CPU the eigen-
    decomposition of the float64 Gram matrix of the smaller side, several
    times faster than LAPACK's SVD there). Large ones: a randomized SVD
    (Halko et al.; exact for a matrix of rank ≤ `rank`), seeded so that the
    same pair of files always gives the same factors."""
    matrix = matrix.float()
    rank = min(rank, *matrix.shape)
    if min(matrix.shape) <= FULL_SVD_MAX_SIDE:
        if matrix.is_cuda:
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        else:
            with one_thread_below(SINGLE_THREAD_MAX_SIDE, min(matrix.shape)):
                u, s, vh = gram_svd(matrix)
        return u[:, :rank], s[:rank], vh[:rank]
    devices = [matrix.device] if matrix.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(matrix, q=min(rank + OVERSAMPLE, *matrix.shape), niter=2)
    return u[:, :rank], s[:rank], v[:, :rank].T


@contextmanager
def one_thread_below(limit: int, side: int):
    """LAPACK on small matrices: one thread. Threads' start-up and spinning cost
    more than the work there, 10× on a busy 2-core machine (measured on eigh of 64×64)."""
    if side > limit or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gram_svd(matrix: torch.Tensor):
    """A thin SVD through the Gram matrix of the smaller side, in float64:
    U spans the range to float64 precision, and Vh = Uᵀ·M / s comes from M
    itself, so U·diag(s)·Vh reproduces M (to float32 rounding) at full rank."""
    if matrix.shape[0] > matrix.shape[1]:
        u, s, vh = gram_svd(matrix.T)
        return vh.T, s, u.T
    m64 = matrix.double()
    eigenvalues, vectors = torch.linalg.eigh(m64 @ m64.T)
    order = torch.argsort(eigenvalues, descending=True)
    u = vectors[:, order]
    projected = u.T @ m64                                   # diag(s)·Vh
    s = torch.linalg.vector_norm(projected, dim=1)          # more accurate than √eigenvalue
    vh = projected / torch.where(s > 0, s, 1.0)[:, None]
    return u.float(), s.float(), vh.float()


def split_factors(u, s, vh):
    """up (out, r), down (r, in): the singular values split evenly between
    them, so both stay in range in fp16."""
    root = s.sqrt()
    return u * root, root[:, None] * vh


# ---------------------------------------------------------------------------
# the budget
# ---------------------------------------------------------------------------

@dataclass
class Candidate:
    """One differing tensor, as the allocation sees it.

    A factorable weight offers its singular values one by one (each costs
    (out + in·k·k) elements); any other tensor offers its whole difference
    at its size."""

    key: str
    shape: tuple
    energy: float                 # ‖D‖² of this tensor (float64 sum)
    singular_values: tuple = ()   # descending; empty: not factorable
    factors: tuple = None         # (up, down) float32 CPU, truncated by `prune` as factoring goes
    diff: torch.Tensor = None     # the whole difference, where a copy may be chosen

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def factorable(self) -> bool:
        return bool(self.singular_values)

    def held_bytes(self) -> int:
        tensors = (self.factors or ()) + ((self.diff,) if self.diff is not None else ())
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def rank_cost(self) -> int:
        """Elements one rank costs: a column of up and a row of down."""
        return self.shape[0] + math.prod(self.shape[1:])


@dataclass
class Allocation:
    ranks: dict                 # key -> rank of its factors
    exact: set                  # keys copied exactly
    spent_bytes: int
    captured_energy: float


def allocate(candidates, budget_bytes: int, element_size: int) -> Allocation:
    """Spend the budget where it captures the most of D per byte.

    Items: every singular value s of every factorable tensor (gain s², cost
    rank_cost elements) and every other tensor (gain ‖D‖², cost its size),
    taken in order of gain per byte while they fit. A tensor whose rank
    reaches the point where an exact copy costs no more than its factors is
    copied instead (exact, and no dearer)."""
    items = []
    for c in candidates:
        if c.factorable:
            items += [(s * s / (c.rank_cost * element_size), c.rank_cost * element_size, c, i)
                      for i, s in enumerate(c.singular_values) if s > 0]
        elif c.energy > 0:
            items.append((c.energy / (c.numel * element_size), c.numel * element_size, c, None))
    items.sort(key=lambda item: -item[0])
    ranks, exact, spent = {}, set(), 0
    for _ratio, cost, c, index in items:
        if spent + cost > budget_bytes:
            continue
        spent += cost
        if index is None:
            exact.add(c.key)
        else:
            ranks[c.key] = ranks.get(c.key, 0) + 1
    by_key = {c.key: c for c in candidates}
    for key, rank in list(ranks.items()):
        c = by_key[key]
        if rank * c.rank_cost >= c.numel:
            del ranks[key]
            exact.add(key)
            spent -= (rank * c.rank_cost - c.numel) * element_size
    captured = sum(by_key[k].energy for k in exact)
    captured += sum(sum(s * s for s in by_key[k].singular_values[:r]) for k, r in ranks.items())
    return Allocation(ranks, exact, spent, captured)


def prune(candidates, budget_bytes: int, element_size: int):
    """Drop the singular values (and exact-only tensors) that can no longer be
    taken: those below the gain per byte at which the higher ones already
    cost the budget. Keeps what factoring holds near the budget."""
    factorable = [c for c in candidates if c.factorable]
    if not factorable:
        return
    ratios = torch.cat([torch.tensor(c.singular_values, dtype=torch.float64) ** 2 / (c.rank_cost * element_size)
                        for c in factorable])
    costs = torch.cat([torch.full((len(c.singular_values),), float(c.rank_cost * element_size), dtype=torch.float64)
                       for c in factorable])
    order = torch.argsort(ratios, descending=True)
    over = torch.nonzero(torch.cumsum(costs[order], 0) > budget_bytes)
    if not len(over):
        return
    threshold = float(ratios[order[over[0, 0]]])
    for c in candidates:
        if c.factorable:
            keep = sum(1 for s in c.singular_values if s * s / (c.rank_cost * element_size) >= threshold)
            if keep < len(c.singular_values):
                c.singular_values = c.singular_values[:keep] or (0.0,)  # (0.0,): factorable, nothing to take
                c.factors = (c.factors[0][:, :keep], c.factors[1][:keep]) if keep else None
                if keep * c.rank_cost < c.numel:
                    c.diff = None  # can no longer become a copy
        elif c.diff is not None and c.energy / (c.numel * element_size) < threshold:
            c.diff = None
            c.energy = 0.0  # counted in the total, no longer takeable


# ---------------------------------------------------------------------------
# factoring a pair of checkpoints
# ---------------------------------------------------------------------------

@dataclass
class LeanFactors:
    """D = θ_active − θ_base within a budget: factors and exact differences,
    float32 on the CPU (or the dtype read back from a file)."""

    factors: dict = field(default_factory=dict)   # weight key -> (up (out, r), down (r, in·k·k))
    exact: dict = field(default_factory=dict)     # key -> D (the tensor's whole difference)
    shapes: dict = field(default_factory=dict)    # weight key -> weight shape (for the conv form)
    budget_bytes: int = 0
    spent_bytes: int = 0
    total_energy: float = 0.0
    captured_energy: float = 0.0
    dtype: torch.dtype = torch.float16
    differing_bytes: int = 0      # what exact mode would hold, in `dtype`

    @property
    def energy_share(self) -> float:
        return self.captured_energy / self.total_energy if self.total_energy > 0 else 1.0

    def ranks(self) -> dict:
        return {key: down.shape[0] for key, (_up, down) in self.factors.items()}


def is_weak_tensor(key: str, dtype: torch.dtype) -> bool:
    return key.startswith((UNET_PREFIX,) + TEXT_PREFIXES) and dtype.is_floating_point


def differing_keys(active, base):
    """The UNet / text-encoder float tensors present in both files (the pair is checked compatible)."""
    return [k for k in active.keys if k in base and is_weak_tensor(k, active.dtypes[k])]


def factor_pair(active, base, budget_bytes: int, dtype: torch.dtype = torch.float16, device=None,
                progress=None, should_stop=None) -> LeanFactors:
    """Factor D = active − base (two open `Checkpoint`s) within `budget_bytes`
    of weights stored in `dtype`. SVDs run on `device` (the GPU when given one).

    `progress(done_bytes, total_bytes)` is called after each tensor;
    `should_stop()` is polled between tensors (FactoringInterrupted)."""
    device = torch.device(device or "cpu")
    element_size = torch.empty((), dtype=dtype).element_size()
    keys = differing_keys(active, base)
    key_set = set(active.keys)
    total = sum(active.nbytes(k) for k in keys)
    # A budget that holds the exact copy gets it: every difference whole, no SVD.
    copy_all = budget_bytes >= estimated_differing_bytes(active, base, element_size)
    candidates, done, total_energy, differing, held = [], 0, 0.0, 0, 0
    for key in keys:
        if should_stop is not None and should_stop():
            raise FactoringInterrupted()
        a, b = active.get(key), base.get(key)
        done += active.nbytes(key)
        if torch.equal(a, b):
            if progress:
                progress(done, total)
            continue
        diff = a.to(device).float() - b.to(device).float()
        del a, b
        differing += diff.numel() * element_size
        if not copy_all and is_factorable(key, tuple(diff.shape), key_set):
            c = factor_candidate(key, diff, budget_bytes, dtype)
        else:
            c = Candidate(key, tuple(diff.shape), float(torch.linalg.vector_norm(diff, dtype=torch.float64) ** 2),
                          diff=diff.to(dtype).cpu())
        total_energy += c.energy
        del diff
        candidates.append(c)
        held += c.held_bytes()
        if held > 2 * budget_bytes + PRUNE_SLACK:
            prune(candidates, budget_bytes, element_size)
            held = sum(c.held_bytes() for c in candidates)
        if progress:
            progress(done, total)
    return assemble(candidates, budget_bytes, dtype, total_energy, differing)


def factor_candidate(key, diff, budget_bytes, dtype) -> Candidate:
    """A factorable tensor's singular values and factors, up to the rank the
    budget (or MAX_RANK) could ever give it. Its whole difference is kept
    only where the allocation may copy it instead: where that rank's factors
    cost as much as the copy (small layers)."""
    shape = tuple(diff.shape)
    element_size = torch.empty((), dtype=dtype).element_size()
    c = Candidate(key, shape, float(torch.linalg.vector_norm(diff, dtype=torch.float64) ** 2))
    cap = min(MAX_RANK, shape[0], c.rank_cost - shape[0], budget_bytes // (c.rank_cost * element_size))
    if cap <= 0:
        c.singular_values = (0.0,)  # factorable, but not even one rank fits
        return c
    u, s, vh = truncated_svd(as_matrix(diff), cap)
    # Beyond the numerical rank a "singular value" is rounding noise: no byte goes there.
    significant = int((s > s[0] * max(shape[0], c.rank_cost) * torch.finfo(torch.float32).eps).sum()) if len(s) else 0
    u, s, vh = u[:, :significant], s[:significant], vh[:significant]
    if not significant:
        c.singular_values = (0.0,)
        return c
    up, down = split_factors(u, s, vh)
    c.singular_values = tuple(float(v) for v in s.cpu())
    c.factors = (up.cpu(), down.cpu())
    if cap * c.rank_cost >= c.numel:
        c.diff = diff.to(dtype).cpu()
    return c


def assemble(candidates, budget_bytes, dtype, total_energy, differing_bytes) -> LeanFactors:
    """The allocation's choice, in `dtype`: factors truncated to their ranks, exact differences."""
    element_size = torch.empty((), dtype=dtype).element_size()
    allocation = allocate(candidates, budget_bytes, element_size)
    result = LeanFactors(budget_bytes=budget_bytes, spent_bytes=allocation.spent_bytes, total_energy=total_energy,
                         captured_energy=allocation.captured_energy, dtype=dtype, differing_bytes=differing_bytes)
    for c in candidates:
        if c.key in allocation.exact:
            result.exact[c.key] = c.diff.to(dtype)
        elif c.key in allocation.ranks:
            r = allocation.ranks[c.key]
            up, down = c.factors
            result.factors[c.key] = (up[:, :r].to(dtype).contiguous(), down[:r].to(dtype).contiguous())
            result.shapes[c.key] = c.shape
    return result


def estimated_differing_bytes(active, base, element_size: int) -> int:
    """The bytes exact mode would hold, from a few runs of each tensor pair
    (a fine-tuned tensor differs in its first elements already): a few KB read
    per tensor instead of both files."""
    import numpy as np  # noqa: PLC0415

    total = 0
    for key in differing_keys(active, base):
        if not np.array_equal(active.read_sample(key), base.read_sample(key)):
            total += math.prod(active.shapes[key]) * element_size
    return total


def default_budget(differing_bytes: int) -> int:
    return int(DEFAULT_BUDGET_SHARE * differing_bytes)


# ---------------------------------------------------------------------------
# the file: a kohya-format LoRA (LyCORIS "full" for copied layers)
# ---------------------------------------------------------------------------

def _webui_loads_exact(key: str, keys) -> bool:
    """A tensor webui's Lora extension can add as a LyCORIS "full" difference
    (`.diff`/`.diff_b` of a module it patches, reached by a LoRA name)."""
    prefix, name = module_prefix(key)
    if name not in ("weight", "bias") or is_embedding(prefix) or lora_name(prefix) is None:
        return False
    return f"{prefix.rpartition('.')[0]}.in_proj_weight" not in keys


def file_tensors(lean: LeanFactors):
    """(tensors, names): the factors under kohya keys with alpha = rank (scale 1),
    copied layers as `.diff`/`.diff_b`, the rest under `pg_exact.<key>`;
    names maps each LoRA name to its checkpoint module prefix."""
    tensors, names = {}, {}
    keys = set(lean.exact) | set(lean.factors)
    factored = {module_prefix(k)[0] for k in lean.factors}
    for key, (up, down) in lean.factors.items():
        prefix = module_prefix(key)[0]
        name = lora_name(prefix) or "pg_" + prefix.replace(".", "_")
        names[name] = prefix
        shape = lean.shapes[key]
        rank = down.shape[0]
        if len(shape) == 4:  # LoCon: a k×k conv to `rank` channels, then a 1×1 conv
            down, up = down.reshape(rank, *shape[1:]), up.reshape(shape[0], rank, 1, 1)
        tensors[f"{name}.lora_down.weight"] = down.contiguous()
        tensors[f"{name}.lora_up.weight"] = up.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    weights = {module_prefix(k)[0] for k in lean.exact if module_prefix(k)[1] == "weight"}
    for key, diff in lean.exact.items():
        prefix, param = module_prefix(key)
        # webui loads a bias difference only next to a weight (`.diff` or factors)
        loadable = _webui_loads_exact(key, keys) and (param == "weight" or prefix in weights or prefix in factored)
        if loadable:
            name = lora_name(prefix)
            names[name] = prefix
            tensors[f"{name}.{'diff' if param == 'weight' else 'diff_b'}"] = diff.contiguous()
        else:
            tensors[PG_EXACT + key] = diff.contiguous()
    return tensors, names


def write_lean_file(lean: LeanFactors, path: str, extra_metadata: dict = None):
    """Write the factors as a safetensors LoRA file (atomically: a temporary file until complete)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    tensors, names = file_tensors(lean)
    info = {"budget_bytes": lean.budget_bytes, "spent_bytes": lean.spent_bytes, "total_energy": lean.total_energy,
            "captured_energy": lean.captured_energy, "differing_bytes": lean.differing_bytes,
            "dtype": str(lean.dtype).replace("torch.", ""), "names": names}
    metadata = {METADATA_KEY: json.dumps(info), "ss_network_module": "networks.lora",
                "ss_network_dim": str(max([d.shape[0] for _, d in lean.factors.values()], default=0)),
                "ss_comment": "Personalization Guidance lean weak weights: fine-tune minus base as LoRA factors"}
    metadata.update(extra_metadata or {})
    tmp = f"{path}.part"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def read_lean_metadata(path: str) -> dict:
    from lib_pg.checkpoints import read_safetensors_header  # noqa: PLC0415

    _header, metadata, _start = read_safetensors_header(path)
    if METADATA_KEY not in metadata:
        raise PGError(f"'{path}' is not a lean weak-weights file written by Personalization Guidance")
    info = json.loads(metadata[METADATA_KEY])
    info["metadata"] = metadata
    return info


def read_lean_file(path: str, device="cpu") -> LeanFactors:
    """The factors and exact differences of a file `write_lean_file` wrote."""
    from safetensors.torch import load_file  # noqa: PLC0415

    info = read_lean_metadata(path)
    names = info["names"]
    # Fresh allocations: safetensors' buffers are only 8-byte aligned, and
    # oneDNN's kernels round differently on those (the cached file must give
    # the freshly factored result bit for bit).
    tensors = {key: tensor.clone() for key, tensor in load_file(path, device=str(device)).items()}
    lean = LeanFactors(budget_bytes=info["budget_bytes"], spent_bytes=info["spent_bytes"],
                       total_energy=info["total_energy"], captured_energy=info["captured_energy"],
                       dtype=getattr(torch, info["dtype"]), differing_bytes=info["differing_bytes"])
    for key, tensor in tensors.items():
        if key.startswith(PG_EXACT):
            lean.exact[key[len(PG_EXACT):]] = tensor
            continue
        name, _, part = key.partition(".")
        prefix = names[name]
        if part == "diff":
            lean.exact[f"{prefix}.weight"] = tensor
        elif part == "diff_b":
            lean.exact[f"{prefix}.bias"] = tensor
        elif part == "lora_down.weight":
            up = tensors[f"{name}.lora_up.weight"]
            rank = tensor.shape[0]
            scale = float(tensors[f"{name}.alpha"]) / rank if f"{name}.alpha" in tensors else 1.0
            up = up.reshape(up.shape[0], rank)
            lean.factors[f"{prefix}.weight"] = (up if scale == 1.0 else up * scale, tensor.reshape(rank, -1))
            lean.shapes[f"{prefix}.weight"] = (up.shape[0], *tensor.shape[1:])
    return lean


# ---------------------------------------------------------------------------
# the weak model
# ---------------------------------------------------------------------------

def low_rank_output(module, up, down, bias_diff):
    """x -> D·x for a layer's factored weight difference (and its bias
    difference): what the weak rows subtract, scaled by 1 − ω."""
    if isinstance(module, torch.nn.Conv2d):
        kernel = down.reshape(down.shape[0], *module.weight.shape[1:]) if down is not None else None
        up_kernel = up.reshape(up.shape[0], -1, 1, 1) if up is not None else None
        bias = bias_diff.reshape(-1, 1, 1) if bias_diff is not None else None

        def output(x):
            if kernel is None:
                return bias
            y = F.conv2d(F.conv2d(x, kernel, None, module.stride, module.padding, module.dilation), up_kernel)
            return y if bias is None else y + bias

        return output

    def output(x):
        if down is None:
            return bias_diff
        return F.linear(F.linear(x, down), up, bias_diff)

    return output


def _correctable(module) -> bool:
    """Layers whose weak rows can take D·x added to the live output."""
    if isinstance(module, torch.nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros"
    return type(module) is torch.nn.Linear


def build_lean_weak_model(model: torch.nn.Module, lean: LeanFactors, settings_omega_key, device_for=None) -> WeakModel:
    """The weak model from lean factors: factored layers (and bias-only
    differences of Linear/Conv layers) as corrections on the weak rows, the
    rest as weak copies θ_live − D (θ_ω for a constant ω), in the live dtype
    on the live (or `device_for`'s) device. ω = 1 keeps nothing."""
    import time  # noqa: PLC0415

    started = time.perf_counter()
    owners = live_parameters(model)
    for key in list(lean.factors) + list(lean.exact):
        if key not in owners:
            raise PGError(f"the lean weak weights do not match the active model: it has no {key}")
    constant = settings_omega_key[0] == "constant"
    omega = settings_omega_key[1] if constant else None
    result = WeakModel(differing_bytes=lean.differing_bytes, base_family="lean factors",
                       live_family=detect_family({k: tuple(p.shape) for k, (_, _, p) in owners.items()}))
    if constant and omega >= 1.0:
        return result
    by_module = {}
    for key in list(lean.factors) + list(lean.exact):
        module, _name, _param = owners[key]
        by_module.setdefault(id(module), (module, module_prefix(key)[0], []))[2].append(key)
    with torch.no_grad():
        for module, prefix, keys in by_module.values():
            param = owners[keys[0]][2]
            device = device_for(param) if device_for else param.device
            dtype = param.dtype
            weight_key, bias_key = f"{prefix}.weight", f"{prefix}.bias"
            factored = weight_key in lean.factors
            bias_only = set(keys) == {bias_key}
            if _correctable(module) and (factored or bias_only):
                up, down = lean.factors.get(weight_key, (None, None))
                bias = lean.exact.get(bias_key)
                # webui's fp8 weight storage computes in fp16: the factors too
                factor_dtype = dtype if torch.empty((), dtype=dtype).element_size() >= 2 else torch.float16
                held = [t.to(device=device, dtype=factor_dtype) if t is not None else None for t in (up, down, bias)]
                layer = WeakLayer(module, (), ref=(), fixed=(), fixed_omega=omega,
                                  corrections=(low_rank_output(module, *held),),
                                  correction_bytes=sum(t.numel() * t.element_size() for t in held if t is not None))
            else:
                names, tensors = [], []
                for key in keys:
                    _m, name, live = owners[key]
                    live = live.detach().to(device)
                    diff = lean.exact[key] if key in lean.exact else (lean.factors[key][0].float() @ lean.factors[key][1].float())
                    ref = (live.float() - diff.to(device).float().reshape(live.shape)).to(dtype)
                    names.append(name)
                    tensors.append(interpolate(ref, live, omega) if constant else ref)
                layer = (WeakLayer(module, tuple(names), fixed=tuple(tensors), fixed_omega=omega) if constant
                         else WeakLayer(module, tuple(names), ref=tuple(tensors)))
            (result.unet if prefix.startswith(UNET_PREFIX) else result.text).append(layer)
    result.build_seconds = time.perf_counter() - started
    return result
