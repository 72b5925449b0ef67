"""Benchmark: does personalization guidance cost what CFG costs?

Drives the project's real code (lib_pg's weak-weight builder, cache and row
routing: the same objects the webui script uses) on a UNet of real size with
random weights, and compares a denoiser step of plain CFG with a step of PG,
alternating the variants in one process (A B A B ...) and quoting medians.

    python bench/run.py --quick            # CPU, SD 1.5 at 320 px: about 15 minutes on 2 cores
    python bench/run.py --device cuda --dtype fp16 --family sd15
    python bench/run.py --device cuda --dtype fp16 --family sdxl

The last line printed is one JSON object with the headline figures. A ratio
is the median over rounds of PG's step time over the same round's CFG step.
On Linux the script re-runs itself with tcmalloc preloaded when the system has
it, as webui.sh launches webui (`NO_TCMALLOC=1` to measure glibc's malloc).
`bench/kernels.py` times what two weight sets cost PyTorch's kernels alone.
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lib_pg.guidance import GuidanceRun, WeakModelCache, live_version  # noqa: E402
from lib_pg.settings import PGSettings  # noqa: E402
from lib_pg.weights import LowRankDelta, build_weak_model, read_checkpoint  # noqa: E402
from bench import lean as lean_bench  # noqa: E402
from tests import ldm_models  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Holder(torch.nn.Module):
    """The live model as webui holds it: the UNet at model.diffusion_model."""

    def __init__(self, unet):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.diffusion_model = unet


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU run of a few minutes: SD 1.5 at small latents")
    parser.add_argument("--tiny", action="store_true", help="seconds: tiny UNet, for CI (figures mean nothing)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--family", default="sd15", choices=["sd15", "sdxl"])
    parser.add_argument("--latent", type=int, default=None, help="latent side (default: 64 sd15, 128 sdxl, 32 quick)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds per configuration")
    parser.add_argument("--batch-sizes", default=None, help="comma separated, default 1,4")
    parser.add_argument("--omega", type=float, default=0.5)
    parser.add_argument("--lean-only", action="store_true",
                        help="lean weak weights only: factoring, memory, error, load time, and CFG / exact / lean step times")
    return parser.parse_args(argv)


def with_webui_allocator():
    """Re-run this script the way webui.sh runs webui on Linux: with tcmalloc
    preloaded when the system has it (webui.sh's prepare_tcmalloc; NO_TCMALLOC
    or an LD_PRELOAD already set opt out, as there). Under glibc's malloc every
    large activation is a fresh mmap, and the page faults of the allocations
    swamp the step times on a CPU (see bench/RESULTS.md)."""
    if not sys.platform.startswith("linux") or os.environ.get("LD_PRELOAD") or os.environ.get("NO_TCMALLOC"):
        return
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=True,
                                 env={**os.environ, "PATH": "/sbin:/usr/sbin:" + os.environ.get("PATH", "")}).stdout
    except (OSError, subprocess.CalledProcessError):
        return
    found = re.search(r"libtcmalloc(?:_minimal)?\.so\.\d+ \(.*\) => (\S+)", listing)
    if found:
        os.environ["LD_PRELOAD"] = found.group(1)
        os.execv(sys.executable, [sys.executable, *sys.argv])


def allocator_in_use() -> str:
    try:
        with open("/proc/self/maps") as maps:
            return "tcmalloc" if "tcmalloc" in maps.read() else "system malloc"
    except OSError:
        return "system malloc"


def build_unet(args, device, dtype):
    if args.tiny:
        return ldm_models.make_sd1("tiny", seed=0, dtype=dtype, device=device).model.diffusion_model
    if args.family == "sdxl":
        return ldm_models.make_sdxl_unet("sdxl", seed=0, device=device, dtype=dtype)
    return ldm_models.make_sd1("sd15", seed=0, dtype=dtype, device=device, unet_only=True).model.diffusion_model


def step_inputs(unet, batch, latent, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    context_dim = unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features if not hasattr(unet, "label_emb") else 2048
    x = torch.randn(batch, unet.in_channels, latent, latent, generator=g).to(device, dtype)
    c = torch.randn(batch, 77, context_dim, generator=g).to(device, dtype)
    uc = torch.randn(batch, 77, context_dim, generator=g).to(device, dtype)
    y = torch.randn(batch, unet.label_emb[0][0].in_features, generator=g).to(device, dtype) if hasattr(unet, "label_emb") else None
    t = torch.full((batch,), 500.0, device=device)
    return x, t, c, uc, y


LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


def make_lora(unet, rank, device, dtype, seed=2):
    """A subject LoRA of the usual kohya layout (every attention, projection and
    feed-forward layer of the transformer blocks) as webui's NetworkModuleLora
    holds it: down/up layers whose output contribution is up(down(x))·scale.
    Returns (corrections for the weak model, bytes of the LoRA's weights)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    corrections, nbytes = {}, 0
    for name, module in unet.named_modules():
        if not (isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and name.endswith(LORA_TARGETS)):
            continue
        if isinstance(module, torch.nn.Linear):
            down = torch.nn.Linear(module.in_features, rank, bias=False)
            up = torch.nn.Linear(rank, module.out_features, bias=False)
        else:  # proj_in/proj_out as 1x1 convolutions (SD 1.x)
            down = torch.nn.Conv2d(module.in_channels, rank, 1, bias=False)
            up = torch.nn.Conv2d(rank, module.out_channels, 1, bias=False)
        with torch.no_grad():
            down.weight.copy_(torch.randn(down.weight.shape, generator=g) * 0.01)
            up.weight.copy_(torch.randn(up.weight.shape, generator=g) * 0.01)
        down.to(device, dtype)
        up.to(device, dtype)
        nbytes += sum(p.numel() * p.element_size() for p in (down.weight, up.weight))
        layer_bytes = sum(p.numel() * p.element_size() for p in (down.weight, up.weight))
        corrections[module] = [LowRankDelta(output=lambda x, down=down, up=up: up(down(x)),
                                            weight=lambda down=down, up=up, m=module: lora_weight(down, up, m),
                                            nbytes=layer_bytes)]
    return corrections, nbytes


def lora_weight(down, up, module):
    """The merged delta up·down, shaped like the layer's weight."""
    return (up.weight.flatten(1) @ down.weight.flatten(1)).reshape(module.weight.shape)


def denoiser_step(unet, run, inputs, batch_cond_uncond):
    """One CFG denoiser step as webui evaluates it (modules/sd_samplers_cfg_denoiser.py):
    rows [cond; uncond], in one UNet call or in two calls of the batch size."""
    x, t, c, uc, y = inputs
    batch = x.shape[0]
    x_in, t_in, ctx = torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, uc])
    y_in = torch.cat([y, y]) if y is not None else None
    if run is not None:
        run.begin_step(0, 20, lambda: (c, uc))
    if batch_cond_uncond:
        return unet(x_in, t_in, context=ctx, y=y_in)
    halves = [unet(x_in[a:a + batch], t_in[a:a + batch], context=ctx[a:a + batch], y=None if y_in is None else y_in[a:a + batch])
              for a in (0, batch)]
    return torch.cat(halves)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_step(unet, run_factory, inputs, bcu, device):
    with run_factory() as run:
        synchronize(device)
        started = time.perf_counter()
        denoiser_step(unet, run, inputs, bcu)
        synchronize(device)
        return time.perf_counter() - started


def count_evals(unet, run_factory, inputs, bcu):
    calls = []
    handle = unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with run_factory() as run:
            denoiser_step(unet, run, inputs, bcu)
    finally:
        handle.remove()
    return len(calls)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    # --quick: 40 (320 px). At 32 the deepest level is 4x4 and PyTorch's CPU
    # convolution picks its slow non-mkldnn kernel for batch-1 inputs that small
    # (see bench/RESULTS.md), which no real image size reaches.
    latent = args.latent or (8 if args.tiny else 40 if args.quick else 128 if args.family == "sdxl" else 64)
    def rounds_for(batch):  # --quick: batch-1 steps are cheap, and noisier next to their length
        return args.rounds or (2 if args.tiny else (9 if batch == 1 else 3) if args.quick else 5)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,2" if args.tiny else "1,4")).split(",")]
    torch.set_grad_enabled(False)

    started = time.perf_counter()
    unet = build_unet(args, device, dtype)
    live = Holder(unet)
    print(f"UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M parameters, {args.dtype} on {device} "
          f"(built in {time.perf_counter() - started:.1f} s); allocator: {allocator_in_use()}", flush=True)

    # The base checkpoint: the same architecture with every UNet weight different
    # (a DreamBooth run touches them all), written as a safetensors file.
    workdir = tempfile.mkdtemp(prefix="pg-bench-")
    base_path = os.path.join(workdir, "base.safetensors")
    g = torch.Generator(device="cpu").manual_seed(1)
    base_cpu = {}
    for name, p in live.state_dict().items():
        base_cpu[name] = (p.float().cpu() + 0.01 * torch.randn(p.shape, generator=g)).to(p.dtype)
    ldm_models.save_checkpoint(base_cpu, base_path)
    del base_cpu
    file_bytes = os.path.getsize(base_path)

    # Build time vs the time to just read the file (warm page cache for both).
    # safetensors maps the file lazily: "reading" means bringing every tensor
    # into memory, which the build does too. Each writes as many bytes as the
    # other and runs right after the other's result was freed, so both find
    # the same allocator state (a fresh 3 GB allocation would page-fault).
    read_checkpoint(base_path)
    reads, builds = [], []
    settings = PGSettings(True, args.omega)
    memory_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    weak = None
    for _ in range(1 if args.lean_only else 3):
        weak = None
        t0 = time.perf_counter()
        state = {key: tensor.clone() for key, tensor in read_checkpoint(base_path).items()}
        reads.append(time.perf_counter() - t0)
        del state
        t0 = time.perf_counter()
        weak = build_weak_model(live, read_checkpoint(base_path), settings.omega_key)
        synchronize(device)
        builds.append(time.perf_counter() - t0)
    if device.type == "cuda":
        extra_bytes = torch.cuda.max_memory_allocated(device) - memory_before
    else:
        extra_bytes = weak.extra_bytes
    os.remove(base_path)

    # The bandwidth floor: a PG step reads the weak weights on top of CFG's
    # live ones, so it cannot take less than CFG plus one pass over them.
    weak_tensors = [t for layer in weak.unet for t in layer.tensors_at(args.omega)]
    streams = []
    for _ in range(3):
        synchronize(device)
        t0 = time.perf_counter()
        for tensor in weak_tensors:
            tensor.sum()
        synchronize(device)
        streams.append(time.perf_counter() - t0)
    stream_s = statistics.median(streams)
    del weak_tensors

    # Per-generation overhead once the weak weights are cached: the same lookup
    # the webui adapter does (fingerprint of the live weights, then the key).
    cache = WeakModelCache()
    key = lambda: (id(live), live_version(live), base_path, settings.omega_key, str(dtype), str(device))  # noqa: E731
    cache.put(key(), weak)
    hits = []
    for _ in range(20):
        t0 = time.perf_counter()
        assert cache.get(key()) is weak
        hits.append((time.perf_counter() - t0) * 1000)

    # PG stripping a LoRA: low-rank corrections on the weak rows, no weight copy.
    # (A merged LoRA leaves CFG's cost unchanged, so plain CFG is its baseline.)
    lean_figures, lean_weak = lean_bench.measure(args, live, device, dtype, latent, workdir)
    loras = {}
    for rank in (() if args.lean_only else (16, 128)):
        corrections, lora_bytes = make_lora(unet, rank, device, dtype)
        weak_lora = build_weak_model(live, None, settings.omega_key, corrections=corrections)
        loras[rank] = (weak_lora, lora_bytes)
        copied = sum(1 for layer in weak_lora.unet if layer.names)
        print(f"LoRA rank {rank}: {len(corrections)} layers ({copied} as weight copies, the rest low-rank), "
              f"{lora_bytes / 2**20:.1f} MiB of LoRA weights, PG extra memory {weak_lora.extra_bytes / 2**20:.1f} MiB", flush=True)

    variants = {
        "cfg": lambda: nullcontext(None),
        "pg_checkpoint": lambda: GuidanceRun(unet, weak, settings),
        "pg_lean": lambda: GuidanceRun(unet, lean_weak, PGSettings(True, 0.5)),
    }
    if not args.lean_only:
        variants["pg_lora16"] = lambda: GuidanceRun(unet, loras[16][0], settings)
        variants["pg_lora128"] = lambda: GuidanceRun(unet, loras[128][0], settings)
    rows, ratios, evals_equal, loads = [], {name: [] for name in variants if name != "cfg"}, True, []
    for batch in batch_sizes:
        inputs = step_inputs(unet, batch, latent, device, dtype)
        for bcu in (True, False):
            evals = {name: count_evals(unet, factory, inputs, bcu) for name, factory in variants.items()}
            evals_equal &= len(set(evals.values())) == 1
            for factory in variants.values():  # warm-up
                time_step(unet, factory, inputs, bcu, device)
            times = {name: [] for name in variants}
            loads.append(os.getloadavg()[0])
            for _ in range(rounds_for(batch)):
                for name, factory in variants.items():
                    times[name].append(time_step(unet, factory, inputs, bcu, device))
            medians = {name: statistics.median(v) for name, v in times.items()}
            # Each round's steps run back to back, so a round's own CFG step is the
            # fairest reference for its PG steps: the ratio is the median of those.
            paired = {name: statistics.median(t / c for t, c in zip(times[name], times["cfg"])) for name in variants}
            for name in ratios:
                ratios[name].append(paired[name])
            rows.append((batch, bcu, medians, evals, paired))
            loads.append(os.getloadavg()[0])
            print(f"  batch {batch}, batch_cond_uncond {'on ' if bcu else 'off'}: "
                  + ", ".join(f"{n} {m * 1000:.1f} ms [{min(times[n]) * 1000:.0f}-{max(times[n]) * 1000:.0f}] "
                              f"({evals[n]} evals)" for n, m in medians.items())
                  + f" (load {loads[-2]:.1f} -> {loads[-1]:.1f})", flush=True)

    result = {
        "machine": platform.node(), "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "allocator": allocator_in_use(), "torch": torch.__version__,
        "family": "tiny" if args.tiny else args.family, "dtype": args.dtype, "latent": latent, "rounds": {b: rounds_for(b) for b in batch_sizes},
        "ratio_checkpoint": max(ratios["pg_checkpoint"]),
        "ratio_lora": max(ratios["pg_lora16"] + ratios["pg_lora128"]) if loras else None,
        "lora_extra_mem_ratio": max(w.extra_bytes / b for w, b in loras.values()) if loras else None,
        "ratio_lean": max(ratios["pg_lean"]),
        "evals_equal": evals_equal,
        "build_s": statistics.median(builds), "read_s": statistics.median(reads),
        "cache_hit_ms": statistics.median(hits),
        "stream_s": stream_s, "ratio_floor_checkpoint": max(1 + stream_s / m["cfg"] for _, _, m, _, _ in rows),
        "extra_mem_ratio": extra_bytes / weak.differing_bytes,
        "differing_mib": weak.differing_bytes / 2**20, "file_mib": file_bytes / 2**20,
        "load_steps": [min(loads), max(loads)], "threads": torch.get_num_threads(),
        **lean_figures,
    }
    print()
    shown = [n for n in ("pg_checkpoint", "pg_lean", "pg_lora16", "pg_lora128") if n in variants]
    print("| batch | batch_cond_uncond | CFG ms | " + " | ".join(f"{n} ms (ratio)" for n in shown[:1]) + " | floor | "
          + " | ".join(f"{n} ms (ratio)" for n in shown[1:]) + " | evals per step |")
    print("|---" * (len(shown) + 5) + "|")
    for batch, bcu, medians, evals, paired in rows:
        cells = [f"{medians[n] * 1000:.1f} ({paired[n]:.3f})" for n in shown]
        cells.insert(1, f"{1 + stream_s / medians['cfg']:.3f}")
        cells = " | ".join(cells)
        print(f"| {batch} | {'on' if bcu else 'off'} | {medians['cfg'] * 1000:.1f} | {cells} | "
              f"{'/'.join(str(evals[n]) for n in variants)} |")
    print(f"\nweak build {result['build_s']:.2f} s vs read {result['read_s']:.2f} s "
          f"({result['build_s'] / result['read_s']:.2f}x); cache hit {result['cache_hit_ms']:.2f} ms; "
          f"extra memory {result['extra_mem_ratio']:.3f} x the differing weights ({result['differing_mib']:.0f} MiB)")
    print(f"floor: one pass over the weak weights takes {stream_s * 1000:.1f} ms, the least a PG step can add to CFG's")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    with_webui_allocator()
    main()
