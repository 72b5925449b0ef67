"""Cost of finding the weak rows of a UNet call by their conditioning.

Times StepRouter.enter_unet (compare every row of the call's context with the
step's distinct conditioning rows, one device sync, build the row plan) for
webui's one-call layout and for Tiled Diffusion's tiled calls, at SD 1.5 and
SDXL context sizes, and the step's one-off grouping of its conditioning rows.
No model runs: these are the costs added to each UNet call.

    python bench/row_matching.py [--device cuda] [--dtype float16] [--rounds 200]

Prints one line per case and a JSON line last.
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lib_pg.routing import StepRouter  # noqa: E402

CONTEXTS = {"sd15": (77, 768), "sdxl": (77, 2048)}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_case(family, batch, tiles, device, dtype, rounds):
    tokens, width = CONTEXTS[family]
    g = torch.Generator().manual_seed(0)
    # a batch of one prompt (webui's usual case): batch identical conditional rows, batch unconditional
    cond = torch.randn(1, tokens, width, generator=g).expand(batch, -1, -1).to(device, dtype)
    uncond = torch.randn(1, tokens, width, generator=g).expand(batch, -1, -1).to(device, dtype)
    context = torch.cat([cond, uncond] * tiles)
    router = StepRouter()
    per_call, per_step = [], []
    for _ in range(rounds):
        router.begin_step(lambda: (cond, uncond), 0.5)
        synchronize(device)
        started = time.perf_counter()
        router.enter_unet(context.shape[0], context)  # the step's first call also groups its rows
        first = time.perf_counter() - started
        router.exit_unet()
        started = time.perf_counter()
        router.enter_unet(context.shape[0], context)
        per_call.append(time.perf_counter() - started)
        router.exit_unet()
        per_step.append(first - per_call[-1])
        assert len(router.current.weak if router.current else ()) == 0  # exit_unet cleared it
    return {"family": family, "batch": batch, "tiles": tiles, "rows": context.shape[0],
            "call_us": round(statistics.median(per_call) * 1e6, 1), "call_min_us": round(min(per_call) * 1e6, 1),
            "step_grouping_us": round(max(statistics.median(per_step), 0.0) * 1e6, 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    results = []
    for family in CONTEXTS:
        for batch, tiles in ((1, 1), (4, 1), (1, 8)):
            result = time_case(family, batch, tiles, device, dtype, args.rounds)
            results.append(result)
            print(f"{family} batch {batch} tiles {tiles} ({result['rows']} rows): {result['call_us']} µs per call (min {result['call_min_us']}), "
                  f"+{result['step_grouping_us']} µs once per step")
    print(json.dumps({"device": str(device), "dtype": args.dtype, "torch_threads": torch.get_num_threads(), "cases": results}))


if __name__ == "__main__":
    main()
