"""Fake of webui 1.10.1 modules/rng.py: per-image seeded noise (CPU generators).

Each image's noise comes from its own torch.Generator seeded with its seed, so a
batch's images equal the same seeds generated one by one (what webui guarantees).
Variation seeds are mixed in with slerp like webui; seed resizing is ignored.
"""

import torch

from modules import devices


# modules/rng.py:slerp
def slerp(val, low, high):
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


class ImageRNG:
    # modules/rng.py:ImageRNG
    def __init__(self, shape, seeds, subseeds=None, subseed_strength=0.0, seed_resize_from_h=0, seed_resize_from_w=0):
        self.shape = tuple(map(int, shape))
        self.seeds = seeds
        self.subseeds = subseeds
        self.subseed_strength = subseed_strength
        self.seed_resize_from_h = seed_resize_from_h
        self.seed_resize_from_w = seed_resize_from_w
        self.generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]
        self.is_first = True

    # modules/rng.py:ImageRNG.first
    def first(self):
        xs = []
        for i, generator in enumerate(self.generators):
            noise = torch.randn(self.shape, generator=generator)
            if self.subseeds is not None and self.subseed_strength != 0 and i < len(self.subseeds):
                sub = torch.randn(self.shape, generator=torch.Generator().manual_seed(int(self.subseeds[i])))
                noise = slerp(self.subseed_strength, noise.reshape(1, -1), sub.reshape(1, -1)).reshape(self.shape)
            xs.append(noise)
        return torch.stack(xs).to(devices.device)

    # modules/rng.py:ImageRNG.next
    def next(self):
        if self.is_first:
            self.is_first = False
            return self.first()
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(devices.device)
