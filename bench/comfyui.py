"""Benchmark in a real ComfyUI: PG in one UNet call against ComfyUI's native two-pass hooks.

ComfyUI can compute PG's weak branch with no custom code: CreateHookModelAsLora(base, strength 1 − ω)
hooked on the negative's CLIP (SetClipHooks, applied to its conditioning) makes the unconditional
branch run on θ_live + (1 − ω)·(θ_base − θ_live), in a UNet call of its own with the hook's weights
patched in and out. The Personalization Guidance node computes the same branch inside CFG's call.
Same model pair (random real-shape SD 1.5: rand-sd15-ft, base rand-sd15), same prompts, sampler and
seed; each variant in a fresh ComfyUI process (its peak RSS is the variant's memory):

    COMFYUI_PATH=... COMFYUI_PYTHON=... python bench/comfyui.py [--size 128] [--steps 4 8] [--rounds 3]

A step's time is the slope between the two step counts (the median run time of each), so model loading
and VAE decoding drop out. The last line printed is one JSON object with the figures.
"""

import argparse
import json
import os
import statistics
import sys

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.e2e import comfyui_harness as h  # noqa: E402

SEED = 1234


def variants(omega, size, steps, cfg):
    common = dict(size=size, steps=steps, cfg=cfg, seed=SEED)
    hooks = h.txt2img(**common)
    hooks["50"] = {"class_type": "CreateHookModelAsLora", "inputs": {"ckpt_name": h.BASE, "strength_model": 1.0 - omega,
                                                                     "strength_clip": 1.0 - omega}}
    hooks["51"] = {"class_type": "SetClipHooks", "inputs": {"clip": ["1", 1], "apply_to_conds": True, "schedule_clip": False,
                                                            "hooks": ["50", 0]}}
    hooks["3"]["inputs"]["clip"] = ["51", 0]
    return {
        "cfg": h.txt2img(**common),
        "pg": h.txt2img(**common, pg={"omega": omega}, reference=h.BASE, weak_negative=h.BASE),
        "hooks": hooks,
    }


def peak_rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def measure(path, python, name, steps_pair, rounds, omega, size, cfg):
    server = h.ComfyUI(path, python).start()
    try:
        times, images = {}, {}
        for steps in steps_pair:
            workflow = variants(omega, size, steps, cfg)[name]
            entry, _ = server.run(workflow)  # warm-up: loading, and PG's weak weights
            error = h.error_message(entry)
            if error:
                raise RuntimeError(f"{name}: {error}\n{server.log_tail()}")
            runs = []
            for _ in range(rounds):
                entry, seconds = server.run(workflow)
                runs.append(seconds)
            times[steps] = statistics.median(runs)
            images[steps] = server.image(entry, "7")
        return times, images, peak_rss_bytes(server.process.pid)
    finally:
        server.stop()


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, nargs=2, default=[4, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--omega", type=float, default=0.5)
    parser.add_argument("--cfg", type=float, default=5.0)
    args = parser.parse_args(argv)
    settings, skip = h.settings_from_env()
    if settings is None:
        raise SystemExit(skip)
    path, python = settings
    h.ensure_models(path, python)
    load_before = os.getloadavg()
    results = {}
    for name in ("cfg", "pg", "hooks"):
        times, images, peak = measure(path, python, name, args.steps, args.rounds, args.omega, args.size, args.cfg)
        low, high = args.steps
        step_s = (times[high] - times[low]) / (high - low)
        results[name] = {"image_s": {str(k): round(v, 3) for k, v in times.items()}, "step_s": round(step_s, 4),
                         "peak_rss_gib": round(peak / 2**30, 2), "image": images[high]}
        print(f"{name}: step {step_s:.3f} s, images {results[name]['image_s']}, peak RSS {peak / 2**30:.2f} GiB", flush=True)
    cfg, pg, hooks = results["cfg"], results["pg"], results["hooks"]
    summary = {
        "size": args.size, "steps": args.steps, "omega": args.omega, "cfg_scale": args.cfg,
        "step_s": {k: v["step_s"] for k, v in results.items()},
        "ratio_pg_vs_cfg": round(pg["step_s"] / cfg["step_s"], 3),
        "ratio_hooks_vs_cfg": round(hooks["step_s"] / cfg["step_s"], 3),
        "ratio_hooks_vs_pg": round(hooks["step_s"] / pg["step_s"], 3),
        "peak_rss_gib": {k: v["peak_rss_gib"] for k, v in results.items()},
        "extra_gib_pg": round(pg["peak_rss_gib"] - cfg["peak_rss_gib"], 2),
        "extra_gib_hooks": round(hooks["peak_rss_gib"] - cfg["peak_rss_gib"], 2),
        "max_pixel_diff_pg_vs_hooks": h.max_difference(pg["image"], hooks["image"]),
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
