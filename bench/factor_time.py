"""Time lean factoring of a checkpoint pair, optionally under cProfile.

    python bench/factor_time.py --make-sd15-pair /tmp/pair     # write the SD 1.5-size synthetic pair once (~1-2 min, 7.9 GB)
    python bench/factor_time.py /tmp/pair/active.safetensors /tmp/pair/base.safetensors [--share 0.08] [--profile]

The SD 1.5-size pair is bench/lean.py's synthetic difference (s_i ∝ 1/(i + 1),
rank ≤ 320, ‖D‖ = 0.02·‖W‖ per layer) of a random SD 1.5 UNet and a random
CLIP-L text encoder, float32. Prints factor_s with the load average before and
after and the threads used (OMP_NUM_THREADS / OMP_WAIT_POLICY apply as set);
--profile adds cProfile's 25 heaviest calls.
"""

import argparse
import cProfile
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lib_pg import lowrank  # noqa: E402
from lib_pg.checkpoints import open_checkpoint  # noqa: E402


def make_sd15_pair(folder):
    from bench.lean import synthetic_reference, text_encoder_pair  # noqa: PLC0415
    from tests import ldm_models  # noqa: PLC0415

    os.makedirs(folder, exist_ok=True)
    unet = ldm_models.make_sd1("sd15", seed=0, unet_only=True)
    live = {k: v.detach() for k, v in unet.state_dict().items() if k.startswith("model.diffusion_model.")}
    text_live, text_reference = text_encoder_pair()
    ldm_models.save_checkpoint({**live, **text_live}, os.path.join(folder, "active.safetensors"))
    ldm_models.save_checkpoint({**synthetic_reference(live), **text_reference}, os.path.join(folder, "base.safetensors"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("active", nargs="?")
    parser.add_argument("base", nargs="?")
    parser.add_argument("--share", type=float, default=lowrank.DEFAULT_BUDGET_SHARE, help="budget, share of the exact copy")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--make-sd15-pair", metavar="FOLDER")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.make_sd15_pair:
        started = time.perf_counter()
        make_sd15_pair(args.make_sd15_pair)
        print(f"wrote {args.make_sd15_pair}/active.safetensors and base.safetensors in {time.perf_counter() - started:.0f} s")
        return
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    element_size = torch.empty((), dtype=dtype).element_size()
    with open_checkpoint(args.active) as a, open_checkpoint(args.base) as b:
        budget = int(args.share * lowrank.estimated_differing_bytes(a, b, element_size))
        load, threads = os.getloadavg()[0], lowrank.factoring_threads()
        profile = cProfile.Profile() if args.profile else None
        started = time.perf_counter()
        if profile:
            profile.enable()
        lean = lowrank.factor_pair(a, b, budget, dtype)
        if profile:
            profile.disable()
        factor_s = time.perf_counter() - started
    ranks = sorted(lean.ranks().values())
    print(f"factor_s {factor_s:.1f} ({threads} threads of {torch.get_num_threads()}, OMP_WAIT_POLICY "
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}, load {load:.1f} before, {os.getloadavg()[0]:.1f} after); "
          f"budget {budget / 2**20:.1f} MiB, energy {100 * lean.energy_share:.2f} %, {len(ranks)} factored "
          f"(median rank {ranks[len(ranks) // 2] if ranks else 0}, max {max(ranks, default=0)}), {len(lean.exact)} copied")
    if profile:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
