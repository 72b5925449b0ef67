"""A realistic fine-tune difference: a tiny SD1 model actually fine-tuned, DreamBooth-style.

Random perturbations (tests/helpers.py fine_tune) are full-rank white noise,
the worst case for low-rank factors; a real fine-tune's difference has a
decaying spectrum. `dreambooth(steps)` trains a copy of the tiny base on a
handful of "subject" latents captioned "a photo of sks dog" with the
ε-prediction loss at random timesteps (Adam, the UNet and optionally the
text encoder trainable), as DreamBooth does without prior preservation.
Cached per process, and on disk (the system's temp folder, keyed by this
file's text and the arguments): training takes a minute on a busy 2-core machine.
"""

import copy
import functools
import hashlib
import os
import tempfile

import torch

from tests.ldm_models import make_sd1

PROMPT = "a photo of sks dog"
# The text encoder's transformer layers train; its token table (49408 rows,
# most never used by the prompt) stays, as with DreamBooth's usual settings.
TEXT_ENCODER_LAYERS = "cond_stage_model.transformer.text_model.encoder."
IMAGES = 4
LATENT = 8


def subject_latents(count: int = IMAGES, side: int = LATENT, seed: int = 7) -> torch.Tensor:
    """A handful of images of one "subject": the same smooth blob pattern,
    shifted and lightly varied per image (latents, 4 channels)."""
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    pattern = torch.stack([torch.exp(-((x - 0.3 * c + 0.2) ** 2 + (y + 0.1 * c) ** 2) * 4) for c in range(4)])
    images = []
    for i in range(count):
        shifted = torch.roll(pattern, shifts=(i, -i), dims=(1, 2))
        images.append(2 * shifted - 0.5 + 0.1 * torch.randn(shifted.shape, generator=g))
    return torch.stack(images)


def _cache_path(*args) -> str:
    with open(__file__, "rb") as f:
        digest = hashlib.sha256(f.read() + repr(args).encode() + torch.__version__.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"pg-test-dreambooth-{digest}.pt")


@functools.lru_cache(maxsize=4)
def dreambooth(steps: int = 200, text_encoder: bool = True, seed: int = 0, lr: float = 5e-4):
    """(base, tuned): the tiny SD1 base and its fine-tune after `steps` Adam steps."""
    base = make_sd1("tiny", seed=seed)
    tuned = copy.deepcopy(base)
    path = _cache_path(steps, text_encoder, seed, lr)
    if os.path.isfile(path):
        tuned.load_state_dict(torch.load(path, weights_only=True))
        return base, tuned
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny kernels: threads cost more than they bring (3× on a busy 2-core machine)
    try:
        train_(tuned, steps, text_encoder, seed, lr)
    finally:
        torch.set_num_threads(threads)
    torch.save(tuned.state_dict(), f"{path}.{os.getpid()}")
    os.replace(f"{path}.{os.getpid()}", path)
    return base, tuned


def train_(tuned, steps, text_encoder, seed, lr):
    torch.manual_seed(seed)
    trainable = [p for n, p in tuned.named_parameters()
                 if n.startswith("model.diffusion_model.") or (text_encoder and n.startswith(TEXT_ENCODER_LAYERS))]
    for p in tuned.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(trainable, lr=lr)
    latents = subject_latents()
    tokens = tuned.cond_stage_model.encode([PROMPT] * len(latents))
    alphas = tuned.alphas_cumprod
    g = torch.Generator().manual_seed(seed + 1)
    with torch.enable_grad():
        for _ in range(steps):
            t = torch.randint(0, len(alphas), (len(latents),), generator=g)
            noise = torch.randn(latents.shape, generator=g)
            a = alphas[t].view(-1, 1, 1, 1)
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            context = tuned.cond_stage_model(tokens)
            loss = torch.nn.functional.mse_loss(tuned.apply_model(noisy, t.float(), context), noise)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    for p in tuned.parameters():
        p.requires_grad_(False)
