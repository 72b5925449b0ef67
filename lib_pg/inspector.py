"""`python -m lib_pg inspect|bake|find-base`: look at a fine-tune against its base,
bake the weak model θ_base + ω·(θ_active − θ_base) into a file, find a base.

Everything streams: one tensor (pair) at a time, so memory stays at about the
largest tensor pair whatever the checkpoint size. Pure torch + safetensors +
numpy (no matplotlib: the bar chart is a hand-written PNG).
"""

import argparse
import json
import math
import os
import struct
import sys
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from lib_pg.checkpoints import (MAX_BASE_DISTANCE, SAFETENSORS_NAMES, UNET_PREFIX, Checkpoint, FingerprintCache,
                                component_of, find_base, looks_like_lora, open_checkpoint)
from lib_pg import lowrank
from lib_pg.errors import PGError
from lib_pg.weights import TEXT_PREFIXES, detect_family, interpolate, same_bits

PROG = "python -m lib_pg"
PROGRESS_MIN_BYTES = 256 * 1024 * 1024  # smaller files finish before progress would help


# ---------------------------------------------------------------------------
# opening a pair
# ---------------------------------------------------------------------------

def is_weak_key(key: str, dtype: torch.dtype) -> bool:
    """A float UNet / text-encoder weight: what the weak model interpolates."""
    return key.startswith((UNET_PREFIX,) + TEXT_PREFIXES) and dtype.is_floating_point


def open_model(path: str, role: str) -> Checkpoint:
    """Open a full checkpoint, refusing LoRAs and files without a UNet."""
    ckpt = open_checkpoint(path, role)
    if looks_like_lora(ckpt.keys):
        raise PGError(f"{role} '{path}' looks like a LoRA (LoRA keys, no model.diffusion_model. keys), "
                      "not a checkpoint: give a full model checkpoint")
    family = detect_family(ckpt.shapes)
    if family.startswith("not a"):
        raise PGError(f"{role} '{path}' is {family}")
    return ckpt


def first_mismatch(active: Checkpoint, base: Checkpoint):
    """The first UNet / text-encoder weight whose key or shape differs, as
    (key, active shape or None, base shape or None); None when compatible."""
    weak_a = {k for k in active.keys if is_weak_key(k, active.dtypes[k])}
    weak_b = {k for k in base.keys if is_weak_key(k, base.dtypes[k])}
    for key in sorted(weak_a | weak_b):
        sa, sb = active.shapes.get(key) if key in weak_a else None, base.shapes.get(key) if key in weak_b else None
        if sa is None or sb is None or tuple(sa) != tuple(sb):
            return key, sa, sb
    return None


def check_pair(active: Checkpoint, base: Checkpoint):
    """PGError naming both families and the first mismatching key unless the
    UNet and text encoders have the same keys and shapes."""
    mismatch = first_mismatch(active, base)
    if mismatch is None:
        return
    key, sa, sb = mismatch
    fa, fb = detect_family(active.shapes), detect_family(base.shapes)
    shape = lambda s: "missing" if s is None else str(list(s))  # noqa: E731
    raise PGError(f"active '{active.path}' ({fa}) and base '{base.path}' ({fb}) do not match: "
                  f"first mismatching key {key} (active {shape(sa)}, base {shape(sb)})")


def open_pair(active_path: str, base_path: str):
    active = open_model(active_path, "active checkpoint")
    try:
        base = open_model(base_path, "base checkpoint")
        check_pair(active, base)
    except BaseException:
        active.close()
        raise
    return active, base


class Progress:
    """A percentage on stderr, every ~5 %, for work over PROGRESS_MIN_BYTES."""

    def __init__(self, label: str, total: int, stream=None, min_total: int = PROGRESS_MIN_BYTES, step: int = 5):
        self.label, self.total, self.step = label, max(total, 1), step
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = total >= min_total
        self.tty = self.enabled and getattr(self.stream, "isatty", lambda: False)()
        self.done = 0
        self.shown = -1

    def advance(self, nbytes: int):
        self.done += nbytes
        if not self.enabled:
            return
        percent = int(100 * self.done / self.total) // self.step * self.step
        if percent > self.shown:
            self.shown = percent
            lead, end = ("\r", "") if self.tty else ("", "\n")
            self.stream.write(f"{lead}{self.label}: {percent:3d}%{end}")
            self.stream.flush()

    def finish(self):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------

@dataclass
class Stats:
    tensors: int = 0
    differing: int = 0
    delta_sq: float = 0.0
    base_sq: float = 0.0
    only_active: int = 0
    only_base: int = 0

    @property
    def relative(self) -> float:
        if self.base_sq > 0:
            return math.sqrt(self.delta_sq / self.base_sq)
        return 0.0 if self.delta_sq == 0 else float("inf")

    def status(self) -> str:
        if self.tensors == 0:
            if self.only_active and self.only_base:
                return "different keys"
            return "only in active" if self.only_active else ("only in base" if self.only_base else "absent")
        state = "differs" if self.differing else "same"
        if self.only_active or self.only_base:
            state += f" (+{self.only_active} keys only in active, {self.only_base} only in base)"
        return state


def unet_block(key: str) -> str:
    """input_blocks.N, middle_block, output_blocks.N, time_embed, out, label_emb, ..."""
    parts = key[len(UNET_PREFIX):].split(".")
    if parts[0] in ("input_blocks", "output_blocks") and len(parts) > 1:
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def _block_order(name: str):
    head, _, index = name.partition(".")
    rank = {"time_embed": 0, "label_emb": 1, "input_blocks": 2, "middle_block": 3, "output_blocks": 4, "out": 5}
    return rank.get(head, 6), int(index) if index.isdigit() else 0, name


COMPONENT_PREFIX = {"UNet": "model.diffusion_model", "text encoder": "cond_stage_model", "VAE": "first_stage_model"}


def component_label(component: str) -> str:
    if component.startswith("text encoder "):
        return f"{component} (conditioner.embedders.{component.split()[-1]})"
    prefix = COMPONENT_PREFIX.get(component)
    return f"{component} ({prefix})" if prefix else f"{component} (schedule buffers etc.)"


def _component_order(name: str):
    rank = {"UNet": 0, "VAE": 2, "other": 3}
    return rank.get(name, 1), name


@dataclass
class Report:
    active_path: str
    base_path: str
    active_family: str
    base_family: str
    active_is_lora: bool = False
    components: dict = field(default_factory=dict)   # component -> Stats
    blocks: dict = field(default_factory=dict)       # UNet block -> Stats

    def ordered_blocks(self):
        return [(name, self.blocks[name]) for name in sorted(self.blocks, key=_block_order)]

    def ordered_components(self):
        return [(name, self.components[name]) for name in sorted(self.components, key=_component_order)]


def _norm_sq(t: torch.Tensor) -> float:
    if not t.numel():
        return 0.0
    if t.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return float(torch.linalg.vector_norm(t, dtype=torch.float32)) ** 2  # no float32 copy
    return float(torch.linalg.vector_norm(t.double())) ** 2


def _delta_norm_sq(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16, torch.float32):
        # a − b rounded once to the files' dtype (exact when a and b are within 2× of
        # each other, as fine-tuned weights are); the norm sums in float32
        return _norm_sq(torch.sub(a, b))
    return _norm_sq(a.double() - b.double())


def _compare_one(active: Checkpoint, base: Checkpoint, key: str, comp: Stats, block):
    """One tensor pair: read, compare, drop (nothing kept past this call)."""
    a, b = active.get(key), base.get(key)
    identical = same_bits(a, b) if a.dtype == b.dtype else torch.equal(a.double(), b.double())
    floats = a.is_floating_point() and b.is_floating_point()
    base_sq = _norm_sq(b) if floats else 0.0
    delta_sq = 0.0 if identical or not floats else _delta_norm_sq(a, b)
    for stats in (comp, block):
        if stats is not None:
            stats.tensors += 1
            stats.differing += 0 if identical else 1
            stats.delta_sq += delta_sq
            stats.base_sq += base_sq


def compare(active: Checkpoint, base: Checkpoint, progress: Progress = None) -> Report:
    """Stream both files key by key: per component and per UNet block, how many
    tensors differ and ‖Δ‖/‖base‖."""
    report = Report(active.path, base.path, detect_family(active.shapes), detect_family(base.shapes),
                    active_is_lora=looks_like_lora(active.keys))
    for key in sorted(set(active.keys) | set(base.keys)):
        comp = report.components.setdefault(component_of(key), Stats())
        block = report.blocks.setdefault(unet_block(key), Stats()) if key.startswith(UNET_PREFIX) else None
        if key not in base:
            comp.only_active += 1
            continue
        if key not in active:
            comp.only_base += 1
            continue
        if tuple(active.shapes[key]) != tuple(base.shapes[key]):  # outside the UNet / text encoders
            comp.only_active += 1
            comp.only_base += 1
            continue
        _compare_one(active, base, key, comp, block)
        if progress is not None:
            progress.advance(active.nbytes(key))
    if progress is not None:
        progress.finish()
    return report


def _bar(value: float, top: float, width: int = 24) -> str:
    if not top or not math.isfinite(value):
        return ""
    return "#" * max(1 if value > 0 else 0, round(width * value / top))


def format_report(report: Report) -> str:
    lines = [
        f"active: {report.active_path}",
        f"  family: {report.active_family}",
        f"  looks like a LoRA: {'yes' if report.active_is_lora else 'no (a full checkpoint)'}",
        f"base:   {report.base_path}",
        f"  family: {report.base_family}",
        "compatible: yes (same UNet and text encoder keys and shapes)",
        "",
        "components (‖Δ‖/‖base‖ over all of the component's tensors):",
    ]
    rows = [(component_label(name), stats) for name, stats in report.ordered_components()]
    width = max(len(label) for label, _ in rows) if rows else 10
    for label, stats in rows:
        detail = ""
        if stats.tensors:
            detail = f"  {stats.relative:9.6f}  ({stats.differing} of {stats.tensors} tensors differ)"
        lines.append(f"  {label:<{width}}  {stats.status():<8}{detail}")
    weak = [name for name, s in report.components.items()
            if s.differing and (name == "UNet" or name.startswith("text encoder"))]
    lines.append("  PG's weak model interpolates: " + (", ".join(sorted(weak, key=_component_order)) if weak
                                                       else "nothing (the weights are identical: PG = CFG)"))
    blocks = report.ordered_blocks()
    if blocks:
        top = max((s.relative for _, s in blocks if math.isfinite(s.relative)), default=0.0)
        bw = max(len(name) for name, _ in blocks)
        lines += ["", "UNet blocks:", f"  {'block':<{bw}}  {'‖Δ‖/‖base‖':>10}  differing"]
        for name, stats in blocks:
            lines.append(f"  {name:<{bw}}  {stats.relative:10.6f}  {stats.differing:>3}/{stats.tensors:<3}  "
                         f"{_bar(stats.relative, top)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# a PNG bar chart with numpy + zlib + struct
# ---------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(pixels: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of an (height, width, 3) uint8 array."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    height, width, channels = pixels.shape
    assert channels == 3
    rows = np.concatenate([np.zeros((height, 1), np.uint8), pixels.reshape(height, width * 3)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)) + _png_chunk(b"IEND", b""))


GROUP_COLOURS = {"input_blocks": (66, 133, 244), "middle_block": (244, 160, 0), "output_blocks": (15, 157, 88)}
OTHER_COLOUR = (120, 120, 120)


def bar_chart(values, colours=None, bar_width: int = 14, gap: int = 4, height: int = 220, margin: int = 12):
    """An (H, W, 3) image: one bar per value, heights relative to the largest
    value, light grid lines at 25 % steps of it; no text."""
    n = len(values)
    width = 2 * margin + n * bar_width + max(n - 1, 0) * gap
    img = np.full((height, max(width, 2 * margin + 1), 3), 255, np.uint8)
    plot_h = height - 2 * margin
    bottom = height - margin
    for quarter in range(1, 5):
        y = bottom - round(plot_h * quarter / 4)
        img[y, margin:width - margin] = (225, 225, 225)
    finite = [v for v in values if math.isfinite(v)]
    top = max(finite, default=0.0)
    for i, value in enumerate(values):
        x0 = margin + i * (bar_width + gap)
        h = plot_h if not math.isfinite(value) else (round(plot_h * value / top) if top > 0 else 0)
        if value > 0:
            h = max(h, 1)
        colour = colours[i] if colours else GROUP_COLOURS["input_blocks"]
        if h:
            img[bottom - h:bottom, x0:x0 + bar_width] = colour
    img[bottom, margin - 4:width - margin + 4] = (0, 0, 0)  # the axis
    return img


def write_block_plot(report: Report, path: str):
    blocks = report.ordered_blocks()
    values = [stats.relative for _, stats in blocks]
    colours = [GROUP_COLOURS.get(name.partition(".")[0], OTHER_COLOUR) for name, _ in blocks]
    img = bar_chart(values, colours)
    with open(path, "wb") as f:
        f.write(encode_png(img))
    return img.shape[1], img.shape[0], [name for name, _ in blocks]


def inspect(active_path: str, base_path: str, plot: str = None, out=None, err=None) -> Report:
    out = out if out is not None else sys.stdout
    active, base = open_pair(active_path, base_path)
    with active, base:
        total = sum(active.nbytes(k) for k in active.keys if k in base)
        report = compare(active, base, Progress("inspect", total, err))
    print(format_report(report), file=out)
    if plot:
        w, h, names = write_block_plot(report, plot)
        print(f"\nwrote {plot} ({w}×{h}): one bar per UNet block, left to right: {', '.join(names)} "
              "(grey: time_embed/label_emb/out, blue: input, orange: middle, green: output; "
              "heights relative to the largest)", file=out)
    return report


# ---------------------------------------------------------------------------
# bake: an incremental safetensors writer
# ---------------------------------------------------------------------------

class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor: the header (dtype, shape,
    data_offsets of every tensor) is computed from shapes and dtypes first, then
    each tensor's bytes are appended in the header's order. The file appears at
    `path` only when every tensor was written (a temporary file until then)."""

    def __init__(self, path: str, entries, metadata: dict = None):
        self.path = path
        self.entries = list(entries)  # [(key, dtype, shape)]
        header, offset = {}, 0
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        for key, dtype, shape in self.entries:
            nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()
            header[key] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape),
                           "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        self.data_bytes = offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self._tmp = f"{path}.part"
        self._file = open(self._tmp, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, key: str, tensor: torch.Tensor):
        name, dtype, shape = self.entries[self._next]
        if key != name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"expected {name} {dtype} {list(shape)}, got {key} {tensor.dtype} {list(tensor.shape)}")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if flat.numel():
            self._file.write(memoryview(flat.view(torch.uint8).numpy()))
        self._next += 1

    def close(self):
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if self._next != len(self.entries):
            os.remove(self._tmp)
            raise ValueError(f"only {self._next} of {len(self.entries)} tensors were written")
        os.replace(self._tmp, self.path)

    def abort(self):
        if self._file is not None:
            self._file.close()
            self._file = None
            if os.path.exists(self._tmp):
                os.remove(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _baked_tensor(active: Checkpoint, base: Checkpoint, key: str, omega: float) -> torch.Tensor:
    """θ_base + ω·(θ_active − θ_base) in the active tensor's dtype; ω = 0 gives the
    base's bits, ω = 1 the active's; keys outside the weak model: the active's."""
    a = active.get(key)
    if not is_weak_key(key, a.dtype) or omega == 1.0:
        return a
    b = base.get(key)
    if b.dtype != a.dtype:
        b = b.to(a.dtype)
    return b if omega == 0.0 else interpolate(b, a, omega)


def _bake_one(writer: SafetensorsWriter, active: Checkpoint, base: Checkpoint, key: str, omega: float):
    writer.write(key, _baked_tensor(active, base, key, omega))  # the pair is dropped on return


def bake(active_path: str, base_path: str, omega: float, out_path: str, err=None) -> dict:
    """Write the weak model at ω as a safetensors file, streaming one tensor pair at a time."""
    if not (isinstance(omega, (int, float)) and 0.0 <= omega <= 1.0):
        raise PGError(f"omega must be between 0 and 1, got {omega}")
    omega = float(omega)
    if not out_path.lower().endswith(".safetensors"):
        raise PGError(f"the output file must end in .safetensors: {out_path}")
    for role, path in (("active", active_path), ("base", base_path)):
        if os.path.exists(out_path) and os.path.exists(path) and os.path.samefile(out_path, path):
            raise PGError(f"the output file is the {role} checkpoint: {out_path}")
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir):
        raise PGError(f"output folder not found: {out_dir}")
    active, base = open_pair(active_path, base_path)
    with active, base:
        keys = sorted(active.keys)
        metadata = dict(active.metadata)
        metadata.update(format="pt", pg_bake=json.dumps({
            "omega": omega, "active": os.path.basename(active_path), "base": os.path.basename(base_path),
            "formula": "base + omega * (active - base) for UNet and text encoder weights"}))
        entries = [(k, active.dtypes[k], active.shapes[k]) for k in keys]
        progress = Progress("bake", sum(active.nbytes(k) for k in keys), err)
        with SafetensorsWriter(out_path, entries, metadata) as writer:
            for key in keys:
                _bake_one(writer, active, base, key, omega)
                progress.advance(active.nbytes(key))
        progress.finish()
        weak = sum(1 for k in keys if is_weak_key(k, active.dtypes[k]))
    return {"tensors": len(keys), "interpolated": weak, "bytes": writer.data_bytes, "omega": omega}


# ---------------------------------------------------------------------------
# extract: lean weak weights as a LoRA file
# ---------------------------------------------------------------------------

FILE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def weights_dtype(active: Checkpoint) -> torch.dtype:
    """The dtype of the active file's UNet weights (what webui would load)."""
    for key in active.keys:
        if key.startswith(UNET_PREFIX) and active.dtypes[key].is_floating_point:
            return active.dtypes[key]
    return torch.float16


def extract(active_path: str, base_path: str, budget_mib: float, out_path: str, dtype: str = None,
            device: str = None, err=None) -> lowrank.LeanFactors:
    """Factor θ_active − θ_base within `budget_mib` (None: the default share of
    the exact copy) and write it as a kohya-format LoRA file."""
    if budget_mib is not None and budget_mib <= 0:
        raise PGError(f"--budget must be a positive number of MiB, got {budget_mib:g}")
    if not out_path.lower().endswith(".safetensors"):
        raise PGError(f"the output file must end in .safetensors: {out_path}")
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(out_dir):
        raise PGError(f"output folder not found: {out_dir}")
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise PGError(f"--device {device}: no CUDA device is available")
    active, base = open_pair(active_path, base_path)
    with active, base:
        torch_dtype = FILE_DTYPES[dtype] if dtype else weights_dtype(active)
        element_size = torch.empty((), dtype=torch_dtype).element_size()
        budget = (int(budget_mib * 2**20) if budget_mib is not None
                  else lowrank.default_budget(lowrank.estimated_differing_bytes(active, base, element_size)))
        keys = lowrank.differing_keys(active, base)
        progress = Progress("extract", sum(active.nbytes(k) for k in keys), err)
        lean = lowrank.factor_pair(active, base, budget, torch_dtype, device,
                                   progress=lambda done, _total: progress.advance(done - progress.done))
        progress.finish()
    if not lean.total_energy:
        raise PGError(f"'{active_path}' and '{base_path}' have the same UNet and text-encoder weights: nothing to extract")
    lowrank.write_lean_file(lean, out_path, {"pg_active": os.path.basename(active_path),
                                             "pg_base": os.path.basename(base_path)})
    return lean


def describe_lean(lean: lowrank.LeanFactors) -> str:
    ranks = sorted(lean.ranks().values())
    spread = f"ranks {ranks[0]}–{ranks[-1]}" if ranks else "no low-rank layers"
    return (f"{len(lean.factors)} layers low-rank ({spread}), {len(lean.exact)} tensors exact; "
            f"{lean.spent_bytes / 2**20:.1f} MiB of {lean.budget_bytes / 2**20:.1f} MiB budget "
            f"(exact copy {lean.differing_bytes / 2**20:.1f} MiB, {str(lean.dtype).replace('torch.', '')}); "
            f"captured {100 * lean.energy_share:.1f} % of the difference's energy")


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other failure
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Inspect, bake and find bases for Personalization Guidance.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("inspect", help="compare a fine-tuned checkpoint with its base")
    p.add_argument("active", metavar="ACTIVE")
    p.add_argument("base", metavar="BASE")
    p.add_argument("--plot", metavar="FILE.png", help="write a bar chart of the per-block difference")
    p = sub.add_parser("bake", help="write θ_base + ω·(θ_active − θ_base) as a safetensors file")
    p.add_argument("active", metavar="ACTIVE")
    p.add_argument("base", metavar="BASE")
    p.add_argument("out", metavar="OUT.safetensors")
    p.add_argument("--omega", type=_number, default=0.5, help="ω in [0, 1] (default 0.5)")
    p = sub.add_parser("extract", help="write θ_active − θ_base as low-rank factors (a kohya-format LoRA file) within a memory budget")
    p.add_argument("active", metavar="ACTIVE")
    p.add_argument("base", metavar="BASE")
    p.add_argument("-o", "--out", metavar="OUT.safetensors", required=True)
    p.add_argument("--budget", type=_number, default=None, metavar="MIB",
                   help=f"MiB of factors and copies (default: {100 * lowrank.DEFAULT_BUDGET_SHARE:.0f} %% of the exact copy)")
    p.add_argument("--dtype", choices=sorted(FILE_DTYPES), default=None, help="stored dtype (default: the active file's)")
    p.add_argument("--device", default=None, help="where the SVDs run, e.g. cuda (default: cpu)")
    p = sub.add_parser("find-base", help="pick the closest base for ACTIVE among CANDIDATE files")
    p.add_argument("active", metavar="ACTIVE")
    p.add_argument("candidates", metavar="CANDIDATE", nargs="+")
    p.add_argument("--max-distance", type=float, default=MAX_BASE_DISTANCE)
    return parser


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv=None, out=None, err=None) -> int:
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    args = build_parser().parse_args(argv)
    try:
        if args.command == "inspect":
            inspect(args.active, args.base, plot=args.plot, out=out, err=err)
        elif args.command == "bake":
            stats = bake(args.active, args.base, args.omega, args.out, err=err)
            print(f"wrote {args.out}: {stats['tensors']} tensors ({stats['interpolated']} interpolated at "
                  f"ω={stats['omega']:g}), {stats['bytes'] / 2**20:.1f} MiB", file=out)
        elif args.command == "extract":
            lean = extract(args.active, args.base, args.budget, args.out, args.dtype, args.device, err=err)
            print(f"wrote {args.out}: {describe_lean(lean)}", file=out)
        elif args.command == "find-base":
            best, distance, ranking = find_base(args.active, args.candidates, FingerprintCache(),
                                                max_distance=args.max_distance)
            for fp, d in ranking:
                print(f"{d:8.4f}  {fp.path}", file=out)
            print(f"base: {best.path} (relative distance {distance:.4f}, threshold {args.max_distance})", file=out)
    except PGError as e:
        print(f"{PROG} {args.command}: error: {_one_line(e.reason)}", file=err)
        return 1
    except OSError as e:
        print(f"{PROG} {args.command}: error: {_one_line(e)}", file=err)
        return 1
    return 0
