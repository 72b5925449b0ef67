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
import zlib
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
# factoring that deep is what a CPU can afford.
MAX_RANK = 256
# Matrices whose smaller side is at most this get a full SVD (cheap, exact);
# larger ones a randomized SVD that stops at the rank the budget can take.
FULL_SVD_MAX_SIDE = 512
# LAPACK (eigh, QR) on a matrix whose smaller side is at most this runs on one
# thread: threads gain at most 1.5× there on an idle machine, and lose 10–100×
# on a busy one (OpenMP threads spin at every barrier while the core they wait
# for runs something else: measured on this project's loaded 2-core machine,
# bench/RESULTS.md). Matrix products keep every thread.
SINGLE_THREAD_MAX_SIDE = 512
# The randomized SVD of a large matrix grows an orthonormal basis of its range
# by blocks of BLOCK columns, each a Gaussian sketch of what the basis still
# misses, refined by POWER_ITERATIONS passes of M·Mᵀ, until the singular values
# it finds fall below what the budget can still take (see `factor_pair`). The
# last OVERSAMPLE columns' singular values are the least accurate: never kept.
BLOCK = 32
POWER_ITERATIONS = 1
OVERSAMPLE = 8
# The first look at every large matrix (factor_pair's first pass): this many
# columns tell how its spectrum starts, enough to order the layers and to bound
# what the budget will take; a difference of rank below it is done there.
SKETCH_WIDTH = 16
# A sketch missing less than this share of its matrix's energy holds all of it.
EXHAUSTED_SHARE = 1e-5
# Factoring holds at most about twice the budget (float32) plus this before it
# drops what can no longer be taken.
PRUNE_SLACK = 64 * 2**20

# Key prefix for differences a kohya/LyCORIS loader cannot express (embeddings,
# OpenCLIP's fused attention, a bias whose weight is the same): webui leaves
# keys it cannot match alone, PG reads them.
PG_EXACT = "pg_exact."
# The same for factors webui's Lora extension cannot load: an embedding table's
# (its lora_patches wrap no nn.Embedding). `<PG_LOWRANK><key>.up` / `.down`.
PG_LOWRANK = "pg_lowrank."
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
    """A Linear or Conv2d weight, or an embedding table, whose forward PG can
    wrap: not an attention projection fused into nn.MultiheadAttention (its
    forward never calls out_proj's). An embedding's difference is factored as
    a (tokens × width) matrix: a fine-tune that trained a few tokens (DreamBooth
    with its text encoder) changes a few rows, a difference of rank ≤ their
    number, which the factors hold for a fraction of a copy of the table."""
    prefix, name = module_prefix(key)
    if name != "weight" or len(shape) not in (2, 4) or (is_embedding(prefix) and len(shape) != 2):
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


def truncated_svd(matrix: torch.Tensor, rank: int, seed: int = 0, floor: float = 0.0, sketch=None, energy=None):
    """(U, s, Vh) of the largest singular values, float32, on the matrix's
    device: at most `rank` of them, and of a large matrix only those down to
    about `floor` (what the budget can still take; 0: down to `rank`).
    Small matrices: exactly (an SVD on a GPU; on a CPU the eigendecomposition
    of the float64 Gram matrix of the smaller side, several times faster than
    LAPACK's SVD there). Large ones: a randomized SVD (`RangeSketch`; exact
    for a matrix of rank below what it sketched), seeded so that the same pair
    of files always gives the same factors; `sketch` continues one begun on
    the same matrix; `energy` is ‖matrix‖² where known."""
    matrix = matrix.float()
    rank = min(rank, *matrix.shape)
    if min(matrix.shape) <= FULL_SVD_MAX_SIDE:
        if matrix.is_cuda:
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        else:
            u, s, vh = gram_svd(matrix)
        return u[:, :rank], s[:rank], vh[:rank]
    if sketch is None:
        sketch = RangeSketch(matrix, seed, energy)
    else:
        sketch.resume(matrix)
    limit = min(rank + OVERSAMPLE, *matrix.shape)
    while sketch.width < limit and not sketch.exhausted:
        settled = sketch.width - OVERSAMPLE
        if floor > 0 and settled > 0 and sketch.values[settled - 1] < floor:
            break  # every value the budget can still take is settled
        sketch.grow(min(BLOCK, limit - sketch.width))
    return sketch.svd(rank)


class RangeSketch:
    """A randomized SVD grown a block at a time (Halko, Martinsson & Tropp
    2011, §4.4–4.5; the blocked QB form of Martinsson & Voronin 2016).

    `basis` (m × k, orthonormal) spans most of M's range; `rows` = basisᵀ·M
    (k × n) holds M within it, so the singular values of `rows` approach M's
    from below (the first ones closely, the last OVERSAMPLE ones least).
    `grow(width)` adds a Gaussian sketch of what the basis misses, refined by
    power iterations; `exhausted` says the basis holds all of M but
    EXHAUSTED_SHARE of its energy (for a matrix of lower rank: all of it, to
    float32 rounding), so that its SVD is M's. Between factor_pair's passes
    `release()` drops the matrix and `rows` (only the basis is kept);
    `resume(matrix)` takes the matrix again and recomputes `rows`."""

    def __init__(self, matrix: torch.Tensor, seed: int, energy: float = None):
        self.generator = torch.Generator().manual_seed(seed)
        self.basis = matrix.new_empty(matrix.shape[0], 0)
        self.values = torch.empty(0, dtype=torch.float64)
        self.energy = squared_norm(matrix) if energy is None else energy
        # Once the basis misses less than this, it holds M: what the energies
        # still differ by is float32 rounding of `rows` (~1e-7 of it) or a tail
        # below 0.3 % of ‖M‖.
        self.tolerance = EXHAUSTED_SHARE * self.energy
        self.resume(matrix)

    @property
    def width(self) -> int:
        return self.basis.shape[1]

    def resume(self, matrix: torch.Tensor):
        held = getattr(self, "matrix", None)
        if held is not None and held.data_ptr() == matrix.data_ptr() and held.shape == matrix.shape:
            return  # still the matrix it holds
        self.matrix = matrix
        self.basis = self.basis.to(matrix.device)
        self.rows = self.basis.T @ matrix
        self.gram = (self.rows @ self.rows.T).double()
        self._update()

    def release(self):
        """Drop the matrix and its rows (a later `resume` brings them back); the basis stays."""
        self.matrix = self.rows = self.gram = None

    def grow(self, width: int):
        m = self.matrix
        omega = torch.randn(m.shape[1], width, generator=self.generator).to(m.device)
        y = self._deflate(m @ omega)
        for _ in range(POWER_ITERATIONS):
            # (M·Mᵀ) applied to what the basis misses; orthonormal in between, or
            # float32 loses the smaller directions to the largest one.
            y = self._deflate(m @ orthonormal(m.T @ orthonormal(y)))
        block = orthonormal(self._deflate(y))  # twice: one projection leaves rounding in the basis's span
        block_rows = block.T @ m
        cross = (self.rows @ block_rows.T).double()
        self.gram = torch.cat([torch.cat([self.gram, cross], 1),
                               torch.cat([cross.T, (block_rows @ block_rows.T).double()], 1)], 0)
        self.basis = torch.cat([self.basis, block], 1)
        self.rows = torch.cat([self.rows, block_rows], 0)
        self._update()

    def _deflate(self, y):
        return y - self.basis @ (self.basis.T @ y) if self.width else y

    def _update(self):
        if not self.width:
            self.exhausted = self.energy == 0.0
            return
        with one_thread_below(SINGLE_THREAD_MAX_SIDE, self.width):
            eigenvalues = torch.linalg.eigvalsh(self.gram).flip(0).clamp(min=0)
        self.values = eigenvalues.sqrt().cpu()
        captured = float(self.gram.trace())  # ‖rows‖²
        self.exhausted = self.energy - captured <= self.tolerance or self.width >= min(self.matrix.shape)

    def svd(self, rank: int):
        """(U, s, Vh) of M within the basis: the first `rank` of them, of those
        settled (all of them once the basis holds M)."""
        keep = self.width if self.exhausted else max(self.width - OVERSAMPLE, 0)
        keep = min(rank, keep)
        u, s, vh = gram_svd(self.rows)
        return (self.basis @ u[:, :keep]), s[:keep], vh[:keep]


def squared_norm(tensor: torch.Tensor) -> float:
    """‖tensor‖², float32 products summed in float64 by runs of NORM_RUN
    elements: within ~1e-7 of the float64 sum, 5–10× faster than a float64
    reduction on a CPU (which converts every element first)."""
    flat = tensor.detach().reshape(-1).float()
    whole = flat.numel() - flat.numel() % NORM_RUN
    runs = flat[:whole].view(-1, 1, NORM_RUN)
    total = float(torch.bmm(runs, runs.transpose(1, 2)).double().sum()) if whole else 0.0
    rest = flat[whole:]
    return total + float(torch.dot(rest, rest))


NORM_RUN = 4096


def orthonormal(y: torch.Tensor) -> torch.Tensor:
    with one_thread_below(SINGLE_THREAD_MAX_SIDE, min(y.shape)):
        return torch.linalg.qr(y).Q


@contextmanager
def one_thread_below(limit: int, side: int):
    """LAPACK on small matrices: one thread (see SINGLE_THREAD_MAX_SIDE). CPU only."""
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
    gram = m64 @ m64.T
    with one_thread_below(SINGLE_THREAD_MAX_SIDE, gram.shape[0]):
        eigenvalues, vectors = torch.linalg.eigh(gram)
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

    def items(self, element_size: int):
        """(gains per byte, costs in bytes) of what this tensor offers the
        allocation, as numpy arrays; None where it offers nothing."""
        import numpy as np  # noqa: PLC0415

        key = (self.singular_values, self.energy, self.diff is not None, element_size)
        cached = getattr(self, "_items", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        if self.factorable:
            cost = float(self.rank_cost * element_size)
            values = np.asarray(self.singular_values, dtype=np.float64)
            items = (values * values / cost, np.full(len(values), cost))
        elif self.diff is not None and self.energy > 0:
            cost = float(self.numel * element_size)
            items = (np.array([self.energy / cost]), np.array([cost]))
        else:
            items = None
        self._items = (key, items)
        return items

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


def take_threshold(candidates, budget_bytes: int, element_size: int) -> float:
    """The gain per byte at which the items known so far, taken best first,
    overflow the budget (0 while they all fit). Known items are true ones or
    fall short of them (a sketch's singular values approach M's from below),
    and items found later only add competition: the final allocation takes
    nothing below this, so nothing below it needs to be computed or kept."""
    import numpy as np  # noqa: PLC0415

    ratios, costs = [], []
    for c in candidates:
        items = c.items(element_size)
        if items is not None:
            ratios.append(items[0])
            costs.append(items[1])
    if not ratios:
        return 0.0
    ratios, costs = np.concatenate(ratios), np.concatenate(costs)
    order = np.argsort(-ratios, kind="stable")
    over = np.nonzero(np.cumsum(costs[order]) > budget_bytes)[0]
    return float(ratios[order[over[0]]]) if len(over) else 0.0


def prune(candidates, budget_bytes: int, element_size: int):
    """Drop the singular values (and exact-only tensors) that can no longer be
    taken: those below `take_threshold`. Keeps what factoring holds near the budget."""
    threshold = take_threshold(candidates, budget_bytes, element_size)
    if threshold <= 0:
        return
    for c in candidates:
        if c.factorable and c.factors is not None:
            keep = sum(1 for s in c.singular_values if s * s / (c.rank_cost * element_size) >= threshold)
            if keep < len(c.singular_values):
                c.singular_values = c.singular_values[:keep] or (0.0,)  # (0.0,): factorable, nothing to take
                c.factors = (c.factors[0][:, :keep], c.factors[1][:keep]) if keep else None
                if keep * c.rank_cost < c.numel:
                    c.diff = None  # can no longer become a copy
        elif not c.factorable and c.diff is not None and c.energy / (c.numel * element_size) < threshold:
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


def factoring_threads() -> int:
    """Threads for factoring on a CPU: torch's setting, less the cores that
    other processes keep busy (the 1-minute load average). OpenMP's threads
    spin at every barrier (its default wait policy): on cores that something
    else also runs, a thread waits for one that is not running, and 2 threads
    on a 2-core machine at load 2–3 factored 4× slower than 1 (bench/RESULTS.md)."""
    threads = torch.get_num_threads()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average (Windows)
        return threads
    cores = os.cpu_count() or threads
    return max(1, min(threads, int(cores - busy + 0.5)))


@contextmanager
def cpu_threads(threads: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def factor_pair(active, base, budget_bytes: int, dtype: torch.dtype = torch.float16, device=None,
                progress=None, should_stop=None, threads: int = None) -> LeanFactors:
    """Factor D = active − base (two open `Checkpoint`s) within `budget_bytes`
    of weights stored in `dtype`. SVDs run on `device` (the GPU when given
    one); on a CPU with `threads` threads (default: `factoring_threads()`).

    Two passes over the files, because a large matrix's randomized SVD costs
    in proportion to the rank it goes down to, and the rank the budget gives a
    layer depends on every other layer. The first pass reads every tensor:
    small ones (norms, biases, matrices up to FULL_SVD_MAX_SIDE) are finished
    there, and every large matrix gets a first sketch (SKETCH_WIDTH columns;
    final where that holds all of it, as for a merged LoRA's difference). The
    second factors the large matrices, best first (their first singular
    value's gain per byte), each only down to `take_threshold` of everything
    known by then: no finer than the final allocation could use.

    `progress(done, total)` is called after each tensor of either pass (in
    bytes read); `should_stop()` is polled between tensors (FactoringInterrupted)."""
    device = torch.device(device or "cpu")
    if device.type != "cpu":
        return _factor_pair(active, base, budget_bytes, dtype, device, progress, should_stop)
    with cpu_threads(threads or factoring_threads()):
        return _factor_pair(active, base, budget_bytes, dtype, device, progress, should_stop)


def _factor_pair(active, base, budget_bytes, dtype, device, progress, should_stop) -> LeanFactors:
    element_size = torch.empty((), dtype=dtype).element_size()
    keys = differing_keys(active, base)
    key_set = set(active.keys)
    # A budget that holds the exact copy gets it: every difference whole, no SVD.
    copy_all = budget_bytes >= estimated_differing_bytes(active, base, element_size)
    factorable = set() if copy_all else {k for k in keys if is_factorable(k, active.shapes[k], key_set)}
    large = {k for k in factorable if min(as_matrix_shape(active.shapes[k])) > FULL_SVD_MAX_SIDE}
    total = sum(active.nbytes(k) for k in keys) + sum(active.nbytes(k) for k in large)
    candidates, pending, done, total_energy, differing, held = [], [], 0, 0.0, 0, 0

    def check_stop():
        if should_stop is not None and should_stop():
            raise FactoringInterrupted()

    def difference(key):
        a, b = active.get(key), base.get(key)
        if torch.equal(a, b):
            return None
        return a.to(device).float() - b.to(device).float()

    def advance(nbytes, added=None):
        nonlocal done, held
        done += nbytes
        if added is not None:
            held += added.held_bytes()
        if held > 2 * budget_bytes + PRUNE_SLACK:
            prune(candidates, budget_bytes, element_size)
            held = sum(c.held_bytes() for c in candidates)
        if progress:
            progress(done, total)

    for key in keys:
        check_stop()
        diff = difference(key)
        if diff is None:
            advance(active.nbytes(key) * (2 if key in large else 1))
            continue
        differing += diff.numel() * element_size
        sketch = None
        if key in large:
            c, sketch = sketch_candidate(key, diff, budget_bytes, dtype)
        elif key in factorable:
            c = factor_candidate(key, diff, budget_bytes, dtype)
        else:
            c = Candidate(key, tuple(diff.shape), squared_norm(diff),
                          diff=diff.to(dtype).cpu())
        del diff
        total_energy += c.energy
        candidates.append(c)
        if sketch is not None:
            pending.append((c, sketch))
        advance(active.nbytes(key) * (2 if key in large and sketch is None else 1), c)

    pending.sort(key=lambda item: -item[0].singular_values[0] ** 2 / item[0].rank_cost)
    for index, (c, sketch) in enumerate(pending):
        check_stop()
        threshold = take_threshold(candidates, budget_bytes, element_size)
        floor = math.sqrt(threshold * c.rank_cost * element_size)
        diff = difference(c.key)
        finished = factor_candidate(c.key, diff, budget_bytes, dtype, floor=floor, sketch=sketch, energy=c.energy)
        del diff
        c.singular_values, c.factors, c.diff = finished.singular_values, finished.factors, finished.diff
        pending[index] = None  # its sketch's basis is no longer needed
        advance(active.nbytes(c.key), c)
    return assemble(candidates, budget_bytes, dtype, total_energy, differing)


def as_matrix_shape(shape) -> tuple:
    return (shape[0], math.prod(shape[1:]))


def key_seed(key: str) -> int:
    """The same seed for a tensor in every run (the same files give the same factors)."""
    return zlib.crc32(key.encode())


def rank_cap(c: "Candidate", budget_bytes: int, element_size: int) -> int:
    """The most rank the budget (or MAX_RANK) could ever give this tensor."""
    return min(MAX_RANK, c.shape[0], c.rank_cost - c.shape[0], budget_bytes // (c.rank_cost * element_size))


def sketch_candidate(key, diff, budget_bytes, dtype):
    """A large matrix's first look: (candidate, sketch). The candidate holds
    the sketch's singular values, each at most the matrix's own (what
    `take_threshold` needs to stay a lower bound); sketch is None where the
    candidate is already final (the sketch held all of the difference, or
    not even rank 1 fits)."""
    element_size = torch.empty((), dtype=dtype).element_size()
    c = Candidate(key, tuple(diff.shape), squared_norm(diff))
    cap = rank_cap(c, budget_bytes, element_size)
    if cap <= 0:
        c.singular_values = (0.0,)
        return c, None
    sketch = RangeSketch(as_matrix(diff).float(), key_seed(key), c.energy)
    sketch.grow(min(SKETCH_WIDTH, cap + OVERSAMPLE))
    if sketch.exhausted or sketch.width >= cap + OVERSAMPLE:
        return factor_candidate(key, diff, budget_bytes, dtype, sketch=sketch), None
    c.singular_values = tuple(float(v) for v in sketch.values) if float(sketch.values[0]) > 0 else (0.0,)
    sketch.release()
    return c, sketch


def factor_candidate(key, diff, budget_bytes, dtype, floor: float = 0.0, sketch=None, energy=None) -> Candidate:
    """A factorable tensor's singular values and factors, up to the rank the
    budget (or MAX_RANK) could ever give it, and of a large matrix down to
    about `floor` (continuing `sketch` where given). Its whole difference is
    kept only where the allocation may copy it instead: where that rank's
    factors cost as much as the copy (small layers). `energy`: ‖diff‖² where known."""
    shape = tuple(diff.shape)
    element_size = torch.empty((), dtype=dtype).element_size()
    c = Candidate(key, shape, squared_norm(diff) if energy is None else energy)
    cap = rank_cap(c, budget_bytes, element_size)
    if cap <= 0:
        c.singular_values = (0.0,)  # factorable, but not even one rank fits
        return c
    u, s, vh = truncated_svd(as_matrix(diff), cap, key_seed(key), floor, sketch, c.energy)
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
        if is_embedding(prefix):  # no LoRA loader reaches an embedding table
            tensors[f"{PG_LOWRANK}{key}.up"] = up.contiguous()
            tensors[f"{PG_LOWRANK}{key}.down"] = down.contiguous()
            continue
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
                "ss_network_dim": str(max([d.shape[0] for k, (_, d) in lean.factors.items()
                                           if not is_embedding(module_prefix(k)[0])], default=0)),
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
        if key.startswith(PG_LOWRANK):
            weight_key, _, part = key[len(PG_LOWRANK):].rpartition(".")
            if part == "down":
                up = tensors[f"{PG_LOWRANK}{weight_key}.up"]
                lean.factors[weight_key] = (up, tensor)
                lean.shapes[weight_key] = (up.shape[0], tensor.shape[1])
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

def _as_input_dtype(x, *tensors):
    """The factors in the rows' dtype where a host computes in another dtype than it stores weights in
    (ComfyUI's manual cast: bf16/fp16 weights, fp32 inputs); unchanged (no copy) when they match."""
    return tuple(t if t is None or t.dtype == x.dtype else t.to(x.dtype) for t in tensors)


def low_rank_output(module, up, down, bias_diff):
    """x -> D·x for a layer's factored weight difference (and its bias
    difference): what the weak rows subtract, scaled by 1 − ω. For an
    embedding, x are token ids and D·x the rows of D they pick: up's rows
    (tokens × rank) times down (rank × width)."""
    if isinstance(module, torch.nn.Embedding):
        def output(ids):
            return F.embedding(ids, up) @ down

        return output
    if isinstance(module, torch.nn.Conv2d):
        kernel = down.reshape(down.shape[0], *module.weight.shape[1:]) if down is not None else None
        up_kernel = up.reshape(up.shape[0], -1, 1, 1) if up is not None else None
        bias = bias_diff.reshape(-1, 1, 1) if bias_diff is not None else None

        def output(x):
            k, u, b = _as_input_dtype(x, kernel, up_kernel, bias)
            if k is None:
                return b
            y = F.conv2d(F.conv2d(x, k, None, module.stride, module.padding, module.dilation), u)
            return y if b is None else y + b

        return output

    def output(x):
        d, u, b = _as_input_dtype(x, down, up, bias_diff)
        if d is None:
            return b
        return F.linear(F.linear(x, d), u, b)

    return output


def torch_correctable(module) -> bool:
    """torch's own layers whose weak rows can take D·x added to the live output
    (a host's subclasses that keep their forward are named by the host's own
    `correctable`; webui's LoRA wrappers and quantized layers get weak copies)."""
    if isinstance(module, torch.nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros"
    if type(module) is torch.nn.Embedding:  # a plain lookup: no norm clipping, no sparse gradients
        return module.max_norm is None
    return type(module) is torch.nn.Linear


def build_lean_weak_model(model: torch.nn.Module, lean: LeanFactors, settings_omega_key, device_for=None,
                          correctable=None) -> WeakModel:
    """The weak model from lean factors: factored layers (and bias-only
    differences of Linear/Conv layers) as corrections on the weak rows, the
    rest as weak copies θ_live − D (θ_ω for a constant ω), in the live dtype
    on the live (or `device_for`'s) device. ω = 1 keeps nothing.
    `correctable(module)`: which layers take corrections (default: torch's own
    Linear, Conv2d and Embedding; a host with layer classes of its own says
    which of them compute F.linear / F.conv2d of their weight)."""
    correctable = correctable or torch_correctable
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
            if correctable(module) and (factored or bias_only):
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
