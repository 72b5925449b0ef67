"""Lean weak weights on trained deltas: error and captured energy per budget.

    python bench/lean_curve.py                      # the wider trained model (trains once: ~20 min on 1 busy core, cached)
    python bench/lean_curve.py --model tiny         # the tests' tiny trained model
    python bench/lean_curve.py --factor-dtypes fp32,fp16

The deltas are real fine-tunes (DreamBooth-style: Adam on a handful of
"subject" latents captioned "a photo of sks dog", ε-loss at random timesteps,
UNet and text-encoder layers trained, as tests/trained_delta.py):
- `tiny`: the tests' model (32 channels; tests/trained_delta.py, 200 steps);
- `wide`: WIDE_UNET, webui's SD1 key layout at 160/320/640 channels (its
  640-wide layers take the randomized SVD, its 320-wide ones the exact one),
  a 256-wide 2-layer CLIP text encoder, 8×8 latents; STEPS steps at LR
  (the movement per weight of a DreamBooth at 5e-6 for 800 steps).

For each budget (a share of the exact copy, in bytes of the live dtype,
float32 here) and each dtype the factors are stored in, it prints the energy
of D captured and lean_error (bench/lean.py: ‖D_lean − D_exact‖ /
‖D_live − D_exact‖ of the weak branch at ω = 0.5, over σ at t = 100…900).
Factors stored in float16 next to a float32 model: each rank costs half the
bytes, so the same budget buys twice the rank (rounding the factors to
float16 costs ~1e-3 of D, far below what truncation costs).
"""

import argparse
import copy
import hashlib
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.lean import lean_error, sampled_inputs, weak_outputs  # noqa: E402
from lib_pg import lowrank  # noqa: E402
from lib_pg.checkpoints import open_checkpoint  # noqa: E402
from lib_pg.weights import UNET_PREFIX, build_weak_model  # noqa: E402
from tests import ldm_models  # noqa: E402
from tests.trained_delta import PROMPT, TEXT_ENCODER_LAYERS, subject_latents  # noqa: E402

WIDE_UNET = dict(model_channels=160, channel_mult=(1, 2, 4), attention_resolutions=(1, 2, 4), num_res_blocks=1,
                 num_heads=8, context_dim=256, transformer_depth=1, in_channels=4, out_channels=4)
WIDE_TEXT = dict(hidden_size=256, num_layers=2, num_heads=4, intermediate_size=1024)
WIDE_LATENT = 8
STEPS = 200
LR = 2e-5
SHARES = (0.02, 0.04, 0.08, 0.16, 0.32)
FACTOR_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_wide(seed=0):
    def build():
        return ldm_models.SD1Model(ldm_models.UNetModel(**WIDE_UNET), ldm_models.CLIPTextEncoder(**WIDE_TEXT),
                                   ldm_models.FirstStageStandIn(32, 64))

    return ldm_models._materialise(build, seed, "cpu", torch.float32)


# Part of the cache key: change it when the training loop changes (its
# arguments and the model's configuration are in the key already).
TRAINING_VERSION = 1


def _cache_path(*args):
    digest = hashlib.sha256(repr((TRAINING_VERSION,) + args).encode() + torch.__version__.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"pg-bench-dreambooth-wide-{digest}.pt")


def dreambooth_wide(steps=STEPS, lr=LR, seed=0):
    """(base, tuned) of the wide model; the fine-tune is cached on disk."""
    base = make_wide(seed)
    tuned = copy.deepcopy(base)
    path = _cache_path(steps, lr, seed, WIDE_UNET, WIDE_TEXT, WIDE_LATENT)
    if os.path.isfile(path):
        tuned.load_state_dict(torch.load(path, weights_only=True))
        return base, tuned
    started = time.perf_counter()
    torch.manual_seed(seed)
    trainable = [p for n, p in tuned.named_parameters()
                 if n.startswith(UNET_PREFIX) or n.startswith(TEXT_ENCODER_LAYERS)]
    for p in tuned.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(trainable, lr=lr)
    latents = subject_latents(side=WIDE_LATENT)
    tokens = tuned.cond_stage_model.encode([PROMPT] * len(latents))
    alphas = tuned.alphas_cumprod
    g = torch.Generator().manual_seed(seed + 1)
    with torch.enable_grad():
        for step in range(steps):
            t = torch.randint(0, len(alphas), (len(latents),), generator=g)
            noise = torch.randn(latents.shape, generator=g)
            a = alphas[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            loss = torch.nn.functional.mse_loss(tuned.apply_model(noisy, t.float(), tuned.cond_stage_model(tokens)), noise)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if step % 50 == 0 or step == steps - 1:
                print(f"  step {step}: loss {float(loss):.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    for p in tuned.parameters():
        p.requires_grad_(False)
    torch.save(tuned.state_dict(), f"{path}.{os.getpid()}")
    os.replace(f"{path}.{os.getpid()}", path)
    return base, tuned


def input_scales(model, inputs):
    """Per factorable UNet weight key: the root mean square of each input
    channel of its layer (a conv's repeated over its k×k taps), from the
    live UNet run on `inputs` (other samples than the error's)."""
    unet = model.model.diffusion_model
    sums, counts, handles = {}, {}, []
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            key = f"{UNET_PREFIX}{name}.weight"

            def hook(module, args, key=key):
                x = args[0].detach().double()
                channels = x.transpose(0, 1).reshape(x.shape[1], -1) if isinstance(module, torch.nn.Conv2d) else x.reshape(-1, x.shape[-1]).T
                sums[key] = sums.get(key, 0) + (channels ** 2).sum(1)
                counts[key] = counts.get(key, 0) + channels.shape[1]

            handles.append(module.register_forward_pre_hook(hook))
    try:
        for x, t, c, _ in inputs:
            unet(x, t, context=c)
    finally:
        for h in handles:
            h.remove()
    scales = {}
    for key, total in sums.items():
        rms = (total / counts[key]).sqrt().float()
        module_weight = dict(unet.named_parameters())[key[len(UNET_PREFIX):]]
        taps = module_weight[0].numel() // module_weight.shape[1]
        scales[key] = rms.repeat_interleave(taps).clamp(min=1e-3 * float(rms.max()))
    return scales


def scaled(state, scales):
    """θ·diag(s) for every weight with input scales (as a matrix out × in·k·k): D·diag(s) is then
    what the factors approximate, and their error counts as it reaches the layer's output."""
    out = dict(state)
    for key, s in scales.items():
        w = state[key]
        out[key] = (w.reshape(w.shape[0], -1).float() * s).reshape(w.shape).to(w.dtype)
    return out


def unscaled(lean, scales):
    for key, (up, down) in list(lean.factors.items()):
        if key in scales:
            lean.factors[key] = (up, (down.float() / scales[key]).to(down.dtype))
    for key, diff in list(lean.exact.items()):
        if key in scales:
            lean.exact[key] = (diff.reshape(diff.shape[0], -1).float() / scales[key]).reshape(diff.shape).to(diff.dtype)
    return lean


def relative_delta(base, tuned):
    """‖D‖ / ‖W‖ over the UNet's factorable weights (how far the fine-tune moved)."""
    b, t = base.state_dict(), tuned.state_dict()
    keys = set(b)
    num = den = 0.0
    for k in b:
        if k.startswith(UNET_PREFIX) and lowrank.is_factorable(k, tuple(b[k].shape), keys):
            num += float((t[k] - b[k]).double().norm() ** 2)
            den += float(b[k].double().norm() ** 2)
    return (num / den) ** 0.5


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="wide", choices=["wide", "tiny"])
    parser.add_argument("--shares", default=",".join(str(s) for s in SHARES))
    parser.add_argument("--factor-dtypes", default="fp32,fp16")
    parser.add_argument("--weightings", default="energy,input",
                        help="energy: D's own singular values (lib_pg's allocation); input: D·diag(input RMS) per layer")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    started = time.perf_counter()
    if args.model == "tiny":
        from tests.trained_delta import dreambooth

        base, tuned = dreambooth()
        latent = 8
    else:
        base, tuned = dreambooth_wide()
        latent = WIDE_LATENT
    print(f"{args.model}: {sum(p.numel() for p in tuned.model.parameters()) / 1e6:.1f} M UNet parameters, fine-tune ready in "
          f"{time.perf_counter() - started:.0f} s; ‖D‖/‖W‖ of the UNet's weights {relative_delta(base, tuned):.4f}", flush=True)
    workdir = tempfile.mkdtemp(prefix="pg-lean-curve-")
    unet = tuned.model.diffusion_model
    inputs = sampled_inputs(unet, latent, torch.device("cpu"), torch.float32)
    scales = input_scales(tuned, sampled_inputs(unet, latent, torch.device("cpu"), torch.float32, seed=23))
    paths = {}
    for weighting in args.weightings.split(","):
        paths[weighting] = (os.path.join(workdir, f"active-{weighting}.safetensors"), os.path.join(workdir, f"base-{weighting}.safetensors"))
        transform = (lambda s: s) if weighting == "energy" else (lambda s: scaled(s, scales))
        ldm_models.save_checkpoint(transform(tuned.state_dict()), paths[weighting][0])
        ldm_models.save_checkpoint(transform(base.state_dict()), paths[weighting][1])
    active_path, base_path = paths[next(iter(paths))]
    exact_out = weak_outputs(tuned, build_weak_model(tuned, base.state_dict(), ("constant", 0.5)), inputs)
    live_out = [unet(x, t, context=c) for x, t, c, _ in inputs]
    with open_checkpoint(active_path) as a, open_checkpoint(base_path) as b:
        exact_bytes = lowrank.estimated_differing_bytes(a, b, 4)  # the exact copy in the live dtype, float32
    rows = []
    for weighting, name in ((w, n) for w in args.weightings.split(",") for n in args.factor_dtypes.split(",")):
        dtype = FACTOR_DTYPES[name]
        for share in (float(s) for s in args.shares.split(",")):
            budget = int(share * exact_bytes)
            t0, load = time.perf_counter(), os.getloadavg()[0]
            with open_checkpoint(paths[weighting][0]) as a, open_checkpoint(paths[weighting][1]) as b:
                lean = lowrank.factor_pair(a, b, budget, dtype)
            factor_s = time.perf_counter() - t0
            if weighting == "input":
                lean = unscaled(lean, scales)
            unet_lean = copy.copy(lean)
            unet_lean.factors = {k: v for k, v in lean.factors.items() if k.startswith(UNET_PREFIX)}
            unet_lean.exact = {k: v for k, v in lean.exact.items() if k.startswith(UNET_PREFIX)}
            weak = lowrank.build_lean_weak_model(tuned, unet_lean, ("constant", 0.5))
            error = lean_error(weak_outputs(tuned, weak, inputs), exact_out, live_out)
            ranks = sorted(lean.ranks().values())
            row = {"model": args.model, "weighting": weighting, "factor_dtype": name, "share": share, "budget_mib": budget / 2**20,
                   "energy": lean.energy_share, "lean_error": error, "factor_s": factor_s, "load": load,
                   "median_rank": ranks[len(ranks) // 2] if ranks else 0, "layers_factored": len(ranks),
                   "copied": len(lean.exact)}
            rows.append(row)
            print(f"{args.model} {weighting:6s} factors {name} budget {100 * share:4.0f} % ({budget / 2**20:7.2f} MiB): energy "
                  f"{100 * lean.energy_share:5.1f} %, lean_error {error:.3f}, median rank {row['median_rank']}, "
                  f"{len(ranks)} factored / {len(lean.exact)} copied, {factor_s:.1f} s (load {load:.1f})", flush=True)
    for pair in paths.values():
        for path in pair:
            os.remove(path)
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
