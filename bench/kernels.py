"""What two weight sets cost a PyTorch kernel, with no PG code involved.

CFG with batch_cond_uncond runs a layer once, on 2·B rows, with one weight.
Any method whose unconditional rows use other weights (PG, or CFG with two
models) must run it twice, on B rows each, with two weights. This times exactly
that for the layer shapes of an SD 1.5 UNet, so the cost PG cannot avoid is
told apart from the cost of its own code.

    python bench/kernels.py               # CPU, fp32, 320 px (bench/run.py --quick's size)
    python bench/kernels.py --latent 64   # 512 px
"""

import argparse
import statistics
import time

import torch

F = torch.nn.functional

# (channels in, channels out, kernel, latent divisor): the convolutions and the
# attention projections of an SD 1.5 UNet, level by level.
SHAPES = [
    ("conv", 320, 320, 3, 1), ("conv", 640, 640, 3, 2), ("conv", 1280, 1280, 3, 4), ("conv", 1280, 1280, 3, 8),
    ("linear", 320, 320, 0, 1), ("linear", 640, 640, 0, 2), ("linear", 1280, 1280, 0, 4), ("linear", 1280, 1280, 0, 8),
]


def timed(fn, repeats):
    fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latent", type=int, default=40)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    b = args.batch
    print(f"| layer | input | one weight, {2 * b} rows (ms) | two weights, {b} + {b} rows (ms) | ratio |")
    print("|---|---|---|---|---|")
    for kind, c_in, c_out, k, divisor in SHAPES:
        side = args.latent // divisor
        g = torch.Generator().manual_seed(0)
        if kind == "conv":
            w1, w2 = (torch.randn(c_out, c_in, k, k, generator=g) for _ in range(2))
            x = torch.randn(2 * b, c_in, side, side, generator=g)
            one = lambda: F.conv2d(x, w1, padding=k // 2)  # noqa: E731
            two = lambda: torch.cat([F.conv2d(x[:b], w1, padding=k // 2), F.conv2d(x[b:], w2, padding=k // 2)])  # noqa: E731
            label, shape = f"conv {k}x{k} {c_in}->{c_out}", f"{side}x{side}"
        else:
            w1, w2 = (torch.randn(c_out, c_in, generator=g) for _ in range(2))
            x = torch.randn(2 * b, side * side, c_in, generator=g)
            one = lambda: F.linear(x, w1)  # noqa: E731
            two = lambda: torch.cat([F.linear(x[:b], w1), F.linear(x[b:], w2)])  # noqa: E731
            label, shape = f"linear {c_in}->{c_out}", f"{side * side} tokens"
        t_one, t_two = timed(one, args.repeats), timed(two, args.repeats)
        print(f"| {label} | {shape} | {t_one * 1000:.2f} | {t_two * 1000:.2f} | {t_two / t_one:.2f} |", flush=True)


if __name__ == "__main__":
    main()
