"""Lean weak weights in the benchmark: factoring time, memory, error, load time.

The difference D = θ_live − θ_ref the factors approximate:
- `--tiny`: a real fine-tune (tests/trained_delta.py: the tiny SD1 UNet trained
  DreamBooth-style, 200 Adam steps on 4 subject latents);
- otherwise a synthetic difference of the real UNet's size with a stated
  spectrum: in every Linear/conv weight (m × n as a matrix),
  D = A·diag(s)·B with A (m × k), B (k × n) Gaussian with unit-norm columns /
  rows (near-orthogonal at these sizes), k = min(m, n, SYNTHETIC_RANK),
  s_i = s_0 / (i + 1) (a power law: LoRA extractions from DreamBooths show
  slowly decaying spectra), s_0 such that ‖D‖ = SYNTHETIC_SCALE·‖W‖ per layer;
  norms and biases get white noise of the same relative size.

lean_error = ‖D_lean(x) − D_exact(x)‖ / ‖D_live(x) − D_exact(x)‖ over the
weak branch's output at ω = 0.5, summed over sampled σ: the share of what PG's
weak branch changes that lean weights get wrong (0: exact mode; 1: as far
off as plain CFG's unconditional branch).
"""

import os
import time

import torch

from lib_pg import lowrank
from lib_pg.checkpoints import open_checkpoint
from lib_pg.guidance import GuidanceRun
from lib_pg.settings import PGSettings
from lib_pg.weights import UNET_PREFIX, build_weak_model
from tests import ldm_models

SYNTHETIC_RANK = 320
SYNTHETIC_SCALE = 0.02
ERROR_TIMESTEPS = (100, 300, 500, 700, 900)
BUDGET_SHARES = (0.02, 0.04, 0.08, 0.16)


def synthetic_reference(state, seed=5):
    """θ_ref = θ_live − D for a state dict (checkpoint keys), with D as described
    in the module docstring (float32 CPU)."""
    g = torch.Generator().manual_seed(seed)
    keys = set(state)
    ref = {}
    for key, weight in state.items():
        w = weight.detach().float().cpu()
        target = SYNTHETIC_SCALE * float(w.norm())
        if lowrank.is_factorable(key, tuple(w.shape), keys):
            m, n = w.shape[0], w[0].numel()
            k = min(m, n, SYNTHETIC_RANK)
            a = torch.nn.functional.normalize(torch.randn(m, k, generator=g), dim=0)
            b = torch.nn.functional.normalize(torch.randn(k, n, generator=g), dim=1)
            s = 1.0 / torch.arange(1, k + 1, dtype=torch.float32)
            d = ((a * s) @ b).reshape(w.shape)
        else:
            d = torch.randn(w.shape, generator=g)
        d *= target / max(float(d.norm()), 1e-30)
        ref[key] = (w - d).to(weight.dtype)
    return ref


def text_encoder_pair():
    """(live, reference) state dicts of a CLIP-L text encoder (SD 1.5's, random
    weights) and its synthetic difference: SD 1.5 DreamBooths often train it too."""
    clip = ldm_models._materialise(lambda: ldm_models.CLIPTextEncoder(768, 12, 12, 3072), 3, "cpu", torch.float32)
    live = {f"cond_stage_model.{k}": v.detach() for k, v in clip.state_dict().items()}
    return live, synthetic_reference(live, seed=6)


def unet_part(lean):
    """The lean factors of the UNet only (the benchmark's live model is the UNet)."""
    part = lowrank.LeanFactors(budget_bytes=lean.budget_bytes, spent_bytes=lean.spent_bytes, total_energy=lean.total_energy,
                               captured_energy=lean.captured_energy, dtype=lean.dtype, differing_bytes=lean.differing_bytes)
    part.factors = {k: v for k, v in lean.factors.items() if k.startswith(UNET_PREFIX)}
    part.exact = {k: v for k, v in lean.exact.items() if k.startswith(UNET_PREFIX)}
    part.shapes = {k: v for k, v in lean.shapes.items() if k.startswith(UNET_PREFIX)}
    return part


def held_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def trained_reference(live):
    """Load the tiny DreamBooth fine-tune into the live UNet; its base's UNet is the reference."""
    from tests.trained_delta import dreambooth

    base, tuned = dreambooth()
    live.model.diffusion_model.load_state_dict(tuned.model.diffusion_model.state_dict())
    return {f"{UNET_PREFIX}{k}": v.clone() for k, v in base.model.diffusion_model.state_dict().items()}


def weak_outputs(live, weak, inputs, omega=0.5):
    """The weak branch's output (θ_ω) for each input: the unconditional row of a
    CFG step whose conditional row has other conditioning."""
    unet = live.model.diffusion_model
    outputs = []
    for x, t, context, y in inputs:
        rows = torch.cat([context + 1, context])
        with GuidanceRun(unet, weak, PGSettings(True, omega)) as run:
            run.begin_step(0, 10, lambda rows=rows: (rows[:1], rows[1:]))
            out = unet(torch.cat([x, x]), torch.cat([t, t]), context=rows, y=None if y is None else torch.cat([y, y]))
        outputs.append(out[1:])
    return outputs


def sampled_inputs(unet, latent, device, dtype, seed=11):
    g = torch.Generator().manual_seed(seed)
    context_dim = 2048 if hasattr(unet, "label_emb") else unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features
    inputs = []
    for step in ERROR_TIMESTEPS:
        x = torch.randn(1, unet.in_channels, latent, latent, generator=g).to(device, dtype)
        c = torch.randn(1, 77, context_dim, generator=g).to(device, dtype)
        y = torch.randn(1, unet.label_emb[0][0].in_features, generator=g).to(device, dtype) if hasattr(unet, "label_emb") else None
        inputs.append((x, torch.full((1,), float(step), device=device), c, y))
    return inputs


def lean_error(lean_out, exact_out, live_out):
    num = sum(float((a.double() - b.double()).norm()) for a, b in zip(lean_out, exact_out))
    den = sum(float((a.double() - b.double()).norm()) for a, b in zip(live_out, exact_out))
    return num / den


def measure(args, live, device, dtype, latent, workdir):
    """Factor, load and compare lean weak weights; returns (figures, the lean weak model at the default budget)."""
    started = time.perf_counter()
    reference = trained_reference(live) if args.tiny else None  # (loads the fine-tune into the live UNet)
    live_state = {k: v.detach().cpu() for k, v in live.state_dict().items()}
    reference = reference or synthetic_reference(live_state)
    text_live, text_reference = ({}, {}) if args.tiny else text_encoder_pair()
    active_path, base_path = os.path.join(workdir, "active.safetensors"), os.path.join(workdir, "lean-base.safetensors")
    ldm_models.save_checkpoint({**live_state, **text_live}, active_path)
    ldm_models.save_checkpoint({**reference, **text_reference}, base_path)
    del live_state, text_live, text_reference
    print(f"lean: difference {'trained (tiny DreamBooth)' if args.tiny else 'synthetic, s_i ∝ 1/(i+1), UNet + CLIP-L'} "
          f"written in {time.perf_counter() - started:.1f} s", flush=True)
    unet = live.model.diffusion_model
    unet_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    element_size = torch.empty((), dtype=dtype).element_size()
    with open_checkpoint(active_path) as a, open_checkpoint(base_path) as b:
        exact_bytes = lowrank.estimated_differing_bytes(a, b, element_size)
    exact = build_weak_model(live, reference, ("constant", 0.5))
    del reference
    inputs = sampled_inputs(unet, latent, device, dtype)
    exact_out = weak_outputs(live, exact, inputs)
    with torch.no_grad():
        live_out = [unet(x, t, context=c, y=y) for x, t, c, y in inputs]
    del exact
    default = lowrank.default_budget(exact_bytes)
    shares = BUDGET_SHARES if args.tiny else (lowrank.DEFAULT_BUDGET_SHARE,)
    rows, figures, lean_weak = [], {}, None
    for share in shares:
        budget = int(share * exact_bytes)
        load = os.getloadavg()[0]
        threads = lowrank.factoring_threads() if device.type == "cpu" else None
        t0 = time.perf_counter()
        with open_checkpoint(active_path) as a, open_checkpoint(base_path) as b:
            lean = lowrank.factor_pair(a, b, budget, dtype, device if device.type == "cuda" else None)
        factor_s = time.perf_counter() - t0
        # The text encoder's factors (SD 1.5 size) are held too, next to the UNet's weak layers.
        text_bytes = (held_bytes(t for k, pair in lean.factors.items() if not k.startswith(UNET_PREFIX) for t in pair)
                      + held_bytes(t for k, t in lean.exact.items() if not k.startswith(UNET_PREFIX)))
        weak = lowrank.build_lean_weak_model(live, unet_part(lean), ("constant", 0.5))
        extra = weak.extra_bytes + text_bytes
        error = lean_error(weak_outputs(live, weak, inputs), exact_out, live_out)
        rows.append((share, budget, lean.energy_share, error, extra, factor_s))
        print(f"lean budget {100 * share:.0f} % of the exact copy ({budget / 2**20:.1f} MiB): energy "
              f"{100 * lean.energy_share:.1f} %, lean_error {error:.3f}, extra {extra / 2**20:.1f} MiB "
              f"(text encoder {text_bytes / 2**20:.1f}; {extra / unet_bytes:.3f} x UNet), factored in {factor_s:.1f} s "
              f"({threads or 'GPU'} threads, load {load:.1f} before, {os.getloadavg()[0]:.1f} after)", flush=True)
        if budget == default or share == lowrank.DEFAULT_BUDGET_SHARE:
            path = os.path.join(workdir, "lean.safetensors")
            lowrank.write_lean_file(lean, path)
            loads = []
            for _ in range(3):
                t0 = time.perf_counter()
                lean_weak = lowrank.build_lean_weak_model(live, unet_part(lowrank.read_lean_file(path)), ("constant", 0.5))
                loads.append((time.perf_counter() - t0) * 1000)
            figures = {"lean_extra_mem_ratio": extra / unet_bytes, "lean_error": error,
                       "lean_energy": lean.energy_share, "factor_s": factor_s, "factor_threads": threads,
                       "factor_load": load, "lean_load_ms": sorted(loads)[1],
                       "lean_budget_mib": budget / 2**20, "lean_exact_mib": exact_bytes / 2**20,
                       "lean_text_mib": text_bytes / 2**20, "lean_file_mib": os.path.getsize(path) / 2**20,
                       "lean_delta": "trained" if args.tiny else f"synthetic power law, rank {SYNTHETIC_RANK}, UNet + CLIP-L"}
    for path in (active_path, base_path, os.path.join(workdir, "lean.safetensors")):
        if os.path.exists(path):
            os.remove(path)
    figures["lean_table"] = [{"share": r[0], "energy": r[2], "lean_error": r[3], "extra_mem_ratio": r[4] / unet_bytes,
                              "factor_s": r[5]} for r in rows]
    return figures, lean_weak
