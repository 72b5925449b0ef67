"""Benchmark: does personalization guidance cost what CFG costs?

Drives the project's real code (lib_pg's weak-weight builder, cache and row
routing: the same objects the webui script uses) on a UNet of real size with
random weights, and compares a denoiser step of plain CFG with a step of PG,
alternating the variants in one process (A B A B ...) and quoting medians.

    python bench/run.py --quick            # CPU, SD 1.5 at small latents, a few minutes
    python bench/run.py --device cuda --dtype fp16 --family sd15
    python bench/run.py --device cuda --dtype fp16 --family sdxl

The last line printed is one JSON object with the headline figures.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lib_pg.guidance import GuidanceRun, WeakModelCache, live_version  # noqa: E402
from lib_pg.settings import PGSettings  # noqa: E402
from lib_pg.weights import LowRankDelta, build_weak_model, read_checkpoint  # noqa: E402
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
    return parser.parse_args(argv)


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
        run.begin_step(0, 20, total_rows=2 * batch, weak_rows=batch)
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
    rounds = args.rounds or (2 if args.tiny else 3 if args.quick else 5)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("1,2" if args.tiny else "1,4")).split(",")]
    torch.set_grad_enabled(False)

    started = time.perf_counter()
    unet = build_unet(args, device, dtype)
    live = Holder(unet)
    print(f"UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M parameters, {args.dtype} on {device} "
          f"(built in {time.perf_counter() - started:.1f} s)", flush=True)

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
    # into memory, which the build does too.
    read_checkpoint(base_path)
    reads, builds = [], []
    settings = PGSettings(True, args.omega)
    memory_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    weak = None
    for _ in range(2):
        t0 = time.perf_counter()
        state = {key: tensor.clone() for key, tensor in read_checkpoint(base_path).items()}
        reads.append(time.perf_counter() - t0)
        del state
        weak = None
        t0 = time.perf_counter()
        weak = build_weak_model(live, read_checkpoint(base_path), settings.omega_key)
        synchronize(device)
        builds.append(time.perf_counter() - t0)
    if device.type == "cuda":
        extra_bytes = torch.cuda.max_memory_allocated(device) - memory_before
    else:
        extra_bytes = weak.extra_bytes
    os.remove(base_path)

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
    loras = {}
    for rank in (16, 128):
        corrections, lora_bytes = make_lora(unet, rank, device, dtype)
        weak_lora = build_weak_model(live, None, settings.omega_key, corrections=corrections)
        loras[rank] = (weak_lora, lora_bytes)
        copied = sum(1 for layer in weak_lora.unet if layer.names)
        print(f"LoRA rank {rank}: {len(corrections)} layers ({copied} as weight copies, the rest low-rank), "
              f"{lora_bytes / 2**20:.1f} MiB of LoRA weights, PG extra memory {weak_lora.extra_bytes / 2**20:.1f} MiB", flush=True)

    variants = {
        "cfg": lambda: nullcontext(None),
        "pg_checkpoint": lambda: GuidanceRun(unet, weak, settings),
        "pg_lora16": lambda: GuidanceRun(unet, loras[16][0], settings),
        "pg_lora128": lambda: GuidanceRun(unet, loras[128][0], settings),
    }
    rows, ratios, evals_equal = [], {name: [] for name in variants if name != "cfg"}, True
    for batch in batch_sizes:
        inputs = step_inputs(unet, batch, latent, device, dtype)
        for bcu in (True, False):
            evals = {name: count_evals(unet, factory, inputs, bcu) for name, factory in variants.items()}
            evals_equal &= len(set(evals.values())) == 1
            for factory in variants.values():  # warm-up
                time_step(unet, factory, inputs, bcu, device)
            times = {name: [] for name in variants}
            for _ in range(rounds):
                for name, factory in variants.items():
                    times[name].append(time_step(unet, factory, inputs, bcu, device))
            medians = {name: statistics.median(v) for name, v in times.items()}
            for name in ratios:
                ratios[name].append(medians[name] / medians["cfg"])
            rows.append((batch, bcu, medians, evals))
            print(f"  batch {batch}, batch_cond_uncond {'on ' if bcu else 'off'}: "
                  + ", ".join(f"{n} {m * 1000:.1f} ms ({evals[n]} evals)" for n, m in medians.items()), flush=True)

    result = {
        "machine": platform.node(), "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "family": "tiny" if args.tiny else args.family, "dtype": args.dtype, "latent": latent, "rounds": rounds,
        "ratio_checkpoint": max(ratios["pg_checkpoint"]),
        "ratio_lora": max(ratios["pg_lora16"] + ratios["pg_lora128"]),
        "lora_extra_mem_ratio": max(w.extra_bytes / b for w, b in loras.values()),
        "evals_equal": evals_equal,
        "build_s": statistics.median(builds), "read_s": statistics.median(reads),
        "cache_hit_ms": statistics.median(hits),
        "extra_mem_ratio": extra_bytes / weak.differing_bytes,
        "differing_mib": weak.differing_bytes / 2**20, "file_mib": file_bytes / 2**20,
    }
    print()
    print("| batch | batch_cond_uncond | CFG ms | PG checkpoint ms (ratio) | PG LoRA r16 ms (ratio) | PG LoRA r128 ms (ratio) | evals per step |")
    print("|---|---|---|---|---|---|---|")
    for batch, bcu, medians, evals in rows:
        cells = " | ".join(f"{medians[n] * 1000:.1f} ({medians[n] / medians['cfg']:.3f})" for n in ("pg_checkpoint", "pg_lora16", "pg_lora128"))
        print(f"| {batch} | {'on' if bcu else 'off'} | {medians['cfg'] * 1000:.1f} | {cells} | "
              f"{'/'.join(str(evals[n]) for n in variants)} |")
    print(f"\nweak build {result['build_s']:.2f} s vs read {result['read_s']:.2f} s "
          f"({result['build_s'] / result['read_s']:.2f}x); cache hit {result['cache_hit_ms']:.2f} ms; "
          f"extra memory {result['extra_mem_ratio']:.3f} x the differing weights ({result['differing_mib']:.0f} MiB)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
