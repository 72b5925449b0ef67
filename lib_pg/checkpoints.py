"""Streaming access to checkpoint files, and automatic base detection.

Nothing here loads a whole checkpoint: `open_checkpoint` lists keys, shapes and
dtypes from the file's header (safetensors) or from a memory-mapped pickle
(.ckpt), and `Checkpoint.get` reads one tensor at a time. `fingerprint` reads a
few hundred kilobytes of a file, so that the closest base among many checkpoints
can be found quickly (`closest_base`, `pick_base`, `FingerprintCache`).

Pure torch + safetensors + numpy; never imports webui.
"""

import hashlib
import json
import os
import re
import struct
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from lib_pg.errors import PGError
from lib_pg.weights import TEXT_PREFIXES, UNET_PREFIX, detect_family

VAE_PREFIX = "first_stage_model."

# ---------------------------------------------------------------------------
# webui's key clean-up (modules/sd_models.py, get_state_dict_from_checkpoint)
# ---------------------------------------------------------------------------

# Old SD1 checkpoints store the CLIP text model without its `text_model.` level.
SD1_KEY_REPLACEMENTS = {
    "cond_stage_model.transformer.embeddings.": "cond_stage_model.transformer.text_model.embeddings.",
    "cond_stage_model.transformer.encoder.": "cond_stage_model.transformer.text_model.encoder.",
    "cond_stage_model.transformer.final_layer_norm.": "cond_stage_model.transformer.text_model.final_layer_norm.",
}
# SD 2.1 Turbo ships in the SGM layout; webui moves it to the LDM one.
SD2_TURBO_KEY_REPLACEMENTS = {"conditioner.embedders.0.": "cond_stage_model."}
_SD2_TURBO_PROBE = "conditioner.embedders.0.model.ln_final.weight"


def clean_key(key: str, replacements: dict) -> str:
    """webui's transform_checkpoint_dict_key: rewrite a key's leading prefix."""
    for text, replacement in replacements.items():
        if key.startswith(text):
            key = replacement + key[len(text):]
    return key


def clean_keys(shapes: dict) -> dict:
    """cleaned key -> key in the file, as webui renames keys when it loads a checkpoint.

    `shapes` maps the file's keys to their shapes (needed to recognise SD 2.1 Turbo)."""
    probe = shapes.get(_SD2_TURBO_PROBE)
    turbo = probe is not None and len(probe) > 0 and probe[0] == 1024
    replacements = SD2_TURBO_KEY_REPLACEMENTS if turbo else SD1_KEY_REPLACEMENTS
    return {clean_key(k, replacements): k for k in shapes}


# ---------------------------------------------------------------------------
# LoRA detection
# ---------------------------------------------------------------------------

_LORA_MARKERS = ("lora_up", "lora_down", "hada_", "lokr_", "oft_", ".lora_A.", ".lora_B.", ".lora.up.", ".lora.down.")
_LORA_PREFIXES = ("lora_unet_", "lora_te")


def looks_like_lora(keys) -> bool:
    """Whether these keys are a LoRA / LyCORIS network rather than a checkpoint:
    LoRA-style keys (lora_up/lora_down, LoHa hada_, LoKr lokr_, OFT oft_, kohya's
    lora_unet_/lora_te prefixes) and no UNet (model.diffusion_model.) keys."""
    found = False
    for key in keys:
        if key.startswith(UNET_PREFIX):
            return False
        if not found and (key.startswith(_LORA_PREFIXES) or any(m in key for m in _LORA_MARKERS)):
            found = True
    return found


# ---------------------------------------------------------------------------
# Lazy checkpoint files
# ---------------------------------------------------------------------------

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}

_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


def read_safetensors_header(path: str):
    """(header without __metadata__, metadata, byte offset of the data section)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise PGError(f"'{path}' is not a safetensors file (shorter than 8 bytes)")
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER or length < 2:
            raise PGError(f"'{path}' is not a valid safetensors file (header length {length})")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PGError(f"'{path}' is not a valid safetensors file (bad JSON header: {e})") from None
    if not isinstance(header, dict):
        raise PGError(f"'{path}' is not a valid safetensors file (header is not an object)")
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata, 8 + length


class Checkpoint:
    """A checkpoint file opened lazily. Keys are webui's cleaned keys.

    `keys` (file order), `shapes` (key -> tuple), `dtypes` (key -> torch.dtype)
    and `metadata` come without reading any tensor; `get(key)` reads one tensor;
    `read_sample(key)` reads a few runs of its elements only (for fingerprints).
    Use as a context manager or call `close()`.
    """

    def __init__(self, path: str):
        self.path = path
        self.format = "safetensors" if path.lower().endswith(".safetensors") else "ckpt"
        self.metadata = {}
        self._file = None        # safetensors: the open file, from the first get()
        self._state = None       # .ckpt: the (memory-mapped) state dict
        self._entries = None     # safetensors: raw key -> (dtype, shape, begin, end) in the file
        if self.format == "safetensors":
            raw_shapes, raw_dtypes = self._open_safetensors()
        else:
            raw_shapes, raw_dtypes = self._open_ckpt()
        self._raw = clean_keys(raw_shapes)
        self.keys = list(self._raw)
        self.shapes = {k: raw_shapes[r] for k, r in self._raw.items()}
        self.dtypes = {k: raw_dtypes[r] for k, r in self._raw.items()}

    # -- opening ---------------------------------------------------------------
    def _open_safetensors(self):
        header, self.metadata, self._data_start = read_safetensors_header(self.path)
        shapes, dtypes, self._entries = {}, {}, {}
        size = os.path.getsize(self.path)
        for key, info in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise PGError(f"'{self.path}' is not a valid safetensors file (tensor '{key}': "
                              f"unsupported entry {info!r})") from None
            if self._data_start + end > size:
                raise PGError(f"'{self.path}' is truncated (tensor '{key}' ends past the end of the file)")
            shapes[key], dtypes[key] = shape, dtype
            self._entries[key] = (dtype, shape, begin, end)
        return shapes, dtypes

    def _open_ckpt(self):
        try:
            try:
                data = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as e:
                if "mmap" not in str(e) and "zip" not in str(e):
                    raise
                # the legacy (pre-zip) format cannot be memory-mapped: read it whole
                data = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling error is a bad input
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
            found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            if found:
                reason = f"it pickles {found.group(1)}, which torch.load(weights_only=True) refuses"
            elif "WeightsUnpickler error" in text or "load key" in text:
                reason = "not a checkpoint torch.load(weights_only=True) can read"
            else:
                reason = text.splitlines()[0] if text else type(e).__name__
            raise PGError(f"cannot read '{self.path}': {reason} (convert it to .safetensors)") from None
        if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]
        if not isinstance(data, dict):
            raise PGError(f"'{self.path}' does not hold a state dict")
        self._state = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        return ({k: tuple(v.shape) for k, v in self._state.items()},
                {k: v.dtype for k, v in self._state.items()})

    # -- reading ----------------------------------------------------------------
    def __contains__(self, key):
        return key in self._raw

    def nbytes(self, key: str) -> int:
        numel = 1
        for s in self.shapes[key]:
            numel *= s
        return numel * _element_size(self.dtypes[key])

    def get(self, key: str) -> torch.Tensor:
        """One tensor, read now into its own CPU memory (nothing else stays resident)."""
        raw = self._raw[key]
        if self._state is not None:
            return self._state[raw]
        dtype, shape, begin, end = self._entries[raw]
        tensor = torch.empty(shape, dtype=dtype)
        if end > begin:
            if self._file is None:
                self._file = open(self.path, "rb", buffering=0)
            self._file.seek(self._data_start + begin)
            view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            done = 0
            while done < len(view):
                n = self._file.readinto(view[done:])
                if not n:
                    raise PGError(f"'{self.path}' is truncated (tensor '{raw}')")
                done += n
        return tensor

    def read_sample(self, key: str, runs: int = 8, run_length: int = 512) -> np.ndarray:
        """Up to runs·run_length elements of a tensor as float32: `runs` contiguous
        runs spread evenly over the flattened tensor (the first one at element 0).
        Reads only those bytes: a few small reads instead of the whole tensor."""
        numel = int(np.prod(self.shapes[key], dtype=np.int64)) if self.shapes[key] else 1
        runs_at = _runs(numel, runs, run_length)
        raw = self._raw[key]
        if self._state is not None:
            flat = self._state[raw].reshape(-1)
            return torch.cat([flat[s:s + n] for s, n in runs_at]).float().numpy()
        dtype, _, begin, _ = self._entries[raw]
        size = _element_size(dtype)
        out = []
        with open(self.path, "rb") as f:
            for s, n in runs_at:
                f.seek(self._data_start + begin + s * size)
                chunk = bytearray(f.read(n * size))
                if len(chunk) != n * size:
                    raise PGError(f"'{self.path}' is truncated (tensor '{raw}')")
                out.append(torch.frombuffer(chunk, dtype=dtype).float())
        return torch.cat(out).numpy()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None
        self._state = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _runs(numel: int, runs: int, run_length: int):
    """(start, length) of `runs` runs of `run_length` elements spread evenly over
    `numel` elements, the first at 0 and the last ending at the end; the whole
    tensor (in runs) when it is that small."""
    if numel <= runs * run_length:
        return [(s, min(run_length, numel - s)) for s in range(0, numel, run_length)]
    span = numel - run_length
    return [(round(i * span / (runs - 1)), run_length) for i in range(runs)]


def open_checkpoint(path: str, role: str = "checkpoint") -> Checkpoint:
    """Open a .safetensors / .ckpt file lazily; PGError (naming `role`) if it is missing or unreadable."""
    if not os.path.isfile(path):
        raise PGError(f"{role} file not found: {path}")
    return Checkpoint(path)


def component_of(key: str) -> str:
    """The part of the model a (cleaned) checkpoint key belongs to: "UNet",
    "text encoder" (SD1/SD2 cond_stage_model), "text encoder N" (SDXL
    conditioner.embedders.N), "VAE", or "other"."""
    if key.startswith(UNET_PREFIX):
        return "UNet"
    if key.startswith("cond_stage_model."):
        return "text encoder"
    if key.startswith("conditioner.embedders."):
        return "text encoder " + key.split(".")[2]
    if key.startswith(VAE_PREFIX):
        return "VAE"
    return "other"


def is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


# ---------------------------------------------------------------------------
# Fingerprints and automatic base detection
# ---------------------------------------------------------------------------

FINGERPRINT_UNET_KEYS = 24
FINGERPRINT_TEXT_KEYS = 8
FINGERPRINT_RUNS = 8          # 8 runs of 512 elements: up to 4096 values per tensor
FINGERPRINT_RUN_LENGTH = 512

# The largest mean relative distance ‖θ_active − θ_base‖/‖θ_base‖ (over the
# sampled weight matrices) at which a candidate is still accepted as the base.
# Measured on tiny SD1 models (tests/ldm_models.py, the models of
# tests/test_base_detection.py), active vs candidate:
#   fine_tune(base, scale=0.002)                      0.014
#   fine_tune(base, scale=0.02)           (UNet)      0.14
#   fine_tune(base, scale=0.02, text_encoder=True)    0.23
#   fine_tune(base, scale=0.05)                       0.36
#   fine_tune(base, scale=0.1)                        0.71
#   a model drawn from another seed                   1.42  (≈ √2: independent weights of equal scale)
#   a fine-tune of another seed's model               1.52
# fine_tune(scale=0.02) already adds noise at 0.1–1× the weights' own scale, far
# more than DreamBooth or a merged LoRA changes (~1e-3–1e-2 relative), and long
# community fine-tunes stay well below 0.5 from their base; unrelated weights
# sit at √2 whatever the model size. 0.7 ≈ √2 / 2: a candidate is accepted only
# when the active model is closer to it than half the distance between two
# unrelated models; it leaves a ×3 margin over the tests' fine-tunes and ×2 below
# unrelated ones.
MAX_BASE_DISTANCE = 0.7


@dataclass
class Fingerprint:
    """A few thousand values from each of a fixed set of UNet and text-encoder
    weights, plus what decides whether two files can be compared at all."""

    path: str
    family: str
    signature: str              # sha1 of the sorted (key, shape) of every float UNet / text-encoder tensor
    samples: dict = field(default_factory=dict)   # key -> float32 numpy array
    shapes: dict = field(default_factory=dict)    # key -> shape of the sampled tensor
    is_lora: bool = False
    identity: tuple = None      # the cache key it was made under

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def _spread(keys, count):
    """`count` keys evenly spread over sorted `keys` (all of them if fewer)."""
    keys = sorted(keys)
    if len(keys) <= count:
        return keys
    return [keys[round(i * (len(keys) - 1) / (count - 1))] for i in range(count)]


def fingerprint_keys(ckpt_shapes: dict, ckpt_dtypes: dict):
    """The keys a fingerprint samples: weight matrices / kernels (≥ 2 dims, float)
    of the UNet and of the text encoders, spread by sorted key order over all blocks."""
    matrices = [k for k, s in ckpt_shapes.items() if len(s) >= 2 and min(s) > 0 and is_float(ckpt_dtypes[k])]
    unet = [k for k in matrices if k.startswith(UNET_PREFIX)]
    text = [k for k in matrices if k.startswith(TEXT_PREFIXES)]
    return _spread(unet, FINGERPRINT_UNET_KEYS) + _spread(text, FINGERPRINT_TEXT_KEYS)


def shape_signature(ckpt_shapes: dict, ckpt_dtypes: dict) -> str:
    h = hashlib.sha1()
    for key in sorted(ckpt_shapes):
        if key.startswith((UNET_PREFIX,) + TEXT_PREFIXES) and is_float(ckpt_dtypes[key]):
            h.update(f"{key}={list(ckpt_shapes[key])};".encode())
    return h.hexdigest()


def fingerprint(path: str) -> Fingerprint:
    """Sample a checkpoint: 32 weight tensors × ≤ 4096 values, read lazily (the
    header plus 256 runs of 512 values: ~0.25 MB of an fp16 SD 1.5 file)."""
    with open_checkpoint(path) as ckpt:
        fp = Fingerprint(path=path, family=detect_family(ckpt.shapes),
                         signature=shape_signature(ckpt.shapes, ckpt.dtypes),
                         is_lora=looks_like_lora(ckpt.keys))
        for key in fingerprint_keys(ckpt.shapes, ckpt.dtypes):
            fp.samples[key] = ckpt.read_sample(key, FINGERPRINT_RUNS, FINGERPRINT_RUN_LENGTH)
            fp.shapes[key] = ckpt.shapes[key]
    return fp


def comparable(a: Fingerprint, b: Fingerprint) -> bool:
    """Same family and the same UNet / text-encoder keys and shapes."""
    return bool(a.samples) and a.family == b.family and a.signature == b.signature


def fingerprint_distance(active: Fingerprint, candidate: Fingerprint) -> float:
    """Mean over the sampled tensors of ‖a − c‖ / ‖c‖ (c: the candidate base's values)."""
    ratios = []
    for key, a in active.samples.items():
        c = candidate.samples.get(key)
        if c is None or c.shape != a.shape:
            continue
        a64, c64 = a.astype(np.float64), c.astype(np.float64)
        norm = float(np.linalg.norm(c64))
        diff = float(np.linalg.norm(a64 - c64))
        if norm == 0.0:
            norm = float(np.linalg.norm(a64))
            if norm == 0.0:
                ratios.append(0.0)
                continue
        ratios.append(diff / norm)
    return float(np.mean(ratios)) if ratios else float("inf")


def _same_file(a: Fingerprint, b: Fingerprint) -> bool:
    if a.identity is not None and a.identity == b.identity:
        return True
    try:
        return os.path.samefile(a.path, b.path)
    except OSError:
        return False


def closest_base(active_fp: Fingerprint, candidate_fps):
    """(best candidate, its distance, ranking) among the candidates of the active
    model's family and shapes; ranking is [(fingerprint, distance)] nearest first.
    The active file itself (same path or same cache identity) is skipped.
    (None, inf, []) when no candidate is comparable."""
    ranking = []
    for fp in candidate_fps:
        if fp is None or _same_file(active_fp, fp) or not comparable(active_fp, fp):
            continue
        ranking.append((fp, fingerprint_distance(active_fp, fp)))
    ranking.sort(key=lambda item: item[1])
    if not ranking:
        return None, float("inf"), []
    return ranking[0][0], ranking[0][1], ranking


def pick_base(active_fp: Fingerprint, candidate_fps, max_distance: float = MAX_BASE_DISTANCE):
    """(best candidate, distance, ranking), or PGError saying why none is plausible:
    the active file is a LoRA, no candidate of its family and shapes exists, or
    the closest one is farther than `max_distance`."""
    candidate_fps = [fp for fp in candidate_fps if fp is not None]
    if active_fp.is_lora:
        raise PGError(f"'{active_fp.name}' looks like a LoRA, not a checkpoint: automatic base detection needs a full checkpoint")
    if not active_fp.samples:
        raise PGError(f"cannot pick a base automatically for '{active_fp.name}' ({active_fp.family})")
    best, distance, ranking = closest_base(active_fp, candidate_fps)
    if best is None:
        others = sorted({fp.family for fp in candidate_fps if not _same_file(active_fp, fp)})
        seen = f" (found only: {', '.join(others)})" if others else ""
        raise PGError(f"no checkpoint of the active model's family ({active_fp.family}, same keys and shapes) "
                      f"to use as its base{seen}: pick the base checkpoint by hand")
    if distance > max_distance:
        raise PGError(f"no plausible base for '{active_fp.name}': the closest {active_fp.family} checkpoint, "
                      f"'{best.name}', differs by {distance:.2f} (relative; a fine-tune of a base is well under "
                      f"{max_distance}, unrelated models about 1.4): pick the base checkpoint by hand")
    return best, distance, ranking


def file_identity(path: str, file_hash: str = None) -> tuple:
    """The cache key of a file: its hash when the caller knows one, else (path, size, mtime)."""
    if file_hash:
        return ("hash", str(file_hash))
    st = os.stat(path)
    return ("stat", os.path.realpath(path), st.st_size, st.st_mtime_ns)


class FingerprintCache:
    """Fingerprints by file identity (see `file_identity`); a hit opens no file.

    Thread-safe; `max_entries` bounds the memory (≈ 0.5 MB per SD 1.5 entry)."""

    def __init__(self, max_entries: int = 512):
        self.max_entries = max_entries
        self._entries = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, path: str, file_hash: str = None) -> Fingerprint:
        identity = file_identity(path, file_hash)
        with self._lock:
            fp = self._entries.get(identity)
            if fp is not None:
                self.hits += 1
                self._entries[identity] = self._entries.pop(identity)  # most recently used last
                return fp
        fp = fingerprint(path)
        fp.identity = identity
        with self._lock:
            self.misses += 1
            self._entries[identity] = fp
            while len(self._entries) > self.max_entries:
                self._entries.pop(next(iter(self._entries)))
        return fp

    def clear(self):
        with self._lock:
            self._entries.clear()

    def __len__(self):
        return len(self._entries)


def find_base(active_path: str, candidate_paths, cache: FingerprintCache = None, active_hash: str = None,
              candidate_hashes=None, max_distance: float = MAX_BASE_DISTANCE):
    """pick_base over files: (best Fingerprint, distance, ranking). Candidates
    that cannot be read are skipped; `candidate_hashes` is an optional list
    parallel to `candidate_paths` (None entries: use (path, size, mtime))."""
    cache = cache if cache is not None else FingerprintCache()
    active_fp = cache.get(active_path, active_hash)
    hashes = list(candidate_hashes) if candidate_hashes is not None else [None] * len(candidate_paths)
    candidates = []
    for path, file_hash in zip(candidate_paths, hashes):
        try:
            candidates.append(cache.get(path, file_hash))
        except (PGError, OSError):
            continue
    return pick_base(active_fp, candidates, max_distance)
