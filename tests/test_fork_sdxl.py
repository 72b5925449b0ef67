"""SDXL on Forge and reForge, through their fakes (tests/fake_forge, tests/fake_reforge): the text
encoders in the fork's own Hugging Face layout (converted at load by the fork's function), PG's
weak weights keyed in that space (lib_pg/hosts/common/forks.py NativeView), the weak negative
conditioning with both the cross-attention context and the pooled `y` vector (clip_g's projection: a
Linear on Forge, a bare Parameter on reForge that the front end registers a second time), LoRAs with
UNet, te1 and te2 layers stripped, lean weights. Every reference is the fake fork's own result (the
base checkpoint loaded by it, the prompt without the LoRA)."""

import importlib

import pytest
import torch

from modules import sd_models, shared

from lib_pg.errors import PGError
from lib_pg.patching import module_state_fingerprint
from tests import test_forge, test_reforge
from tests.fork_lora_keys import clip_keys, unet_keys
from tests.helpers import fine_tune
from tests.ldm_models import make_sdxl, save_checkpoint
from tests.test_forge import forge  # noqa: F401 (the SD 1.x fixtures, for test_lean_on_sd1_too)
from tests.test_reforge import reforge  # noqa: F401
from tests.test_script import generate_with, load_script_module, reset_fake_webui, same_images

FORKS = {
    "forge": (test_forge, test_forge.FAKE_FORGE, "_forget_fake_forge", "forge_host", "lib_pg.hosts.forge.controller",
              "backend.sampling.sampling_function"),
    "reforge": (test_reforge, test_reforge.FAKE_REFORGE, "_forget_fake_reforge", "reforge_host", "lib_pg.hosts.reforge.controller",
                "ldm_patched.modules.samplers"),
}
PLAIN = "a photo of sks dog"
DOG = "a photo of sks dog <lora:xl:1>"
# The weak rows of a batched call run per layer: float rounding differs from a whole-batch call.
CLOSE = dict(rtol=1e-4, atol=1e-4)


def pg(omega, base="xlbase", **extra):
    return [{"enabled": True, "omega": omega, "base": base, **extra}]


def strip(omega, **extra):
    return [{"enabled": True, "omega": omega, "base": "", "strip_loras": True, **extra}]


def structured_unet_delta(model, rank=2, seed=1):
    """A fine-tune's UNet difference as a real one looks (a decaying spectrum, not white noise, the worst
    case for lean factors): rank-`rank` products on every UNet weight matrix/kernel, small noise elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.startswith("model.diffusion_model."):
                continue
            if param.dim() >= 2:
                rows, cols = param.shape[0], param[0].numel()
                r = min(rank, rows, cols)
                up = torch.randn(rows, r, generator=generator) / (torch.arange(r) + 1.0)
                delta = (up @ torch.randn(r, cols, generator=generator)).reshape(param.shape)
                param.add_(0.05 * param.std() * delta / delta.std().clamp_min(1e-12))
            else:
                param.add_(torch.randn(param.shape, generator=generator) * 0.002)


class XLEnv:
    """The fake webui with a fork's fake installed and a tiny SDXL "fine-tune" (UNet and both text
    encoders perturbed) loaded as the fork loads it; the base next to it."""

    def __init__(self, fork, tmp_path, monkeypatch):
        self.fork, self.monkeypatch = fork, monkeypatch
        module, _path, _forget, host, adapter, samplers = FORKS[fork]
        reset_fake_webui()
        self.base_inner = make_sdxl("tiny", seed=0)
        self.tuned_inner = fine_tune(self.base_inner, text_encoder=True, unet=False)
        structured_unet_delta(self.tuned_inner)
        sd_models.model_path = str(tmp_path)
        save_checkpoint(self.base_inner.state_dict(), tmp_path / "xlbase.safetensors")
        save_checkpoint(self.tuned_inner.state_dict(), tmp_path / "xltuned.safetensors")
        sd_models.list_models()
        self.host = importlib.import_module(host)
        self.samplers = importlib.import_module(samplers)
        self.networks = module.load_fake_networks(monkeypatch)
        self.script_module = load_script_module()
        self.model = self.load("xltuned", self.tuned_inner)
        self.adapter = importlib.import_module(adapter)

    def load(self, name, inner):
        info = sd_models.get_closet_checkpoint_match(name)
        model = self.host.make_sdxl_model(inner.state_dict(), info)
        sd_models.set_model(model, info)
        if self.fork == "forge":
            self.host.install(model, self.monkeypatch, engine_name="StableDiffusionXL", networks=self.networks)
        else:
            self.host.install(model, self.monkeypatch, networks=self.networks)
        self.model = model
        return model

    def generate(self, pg_args=None, **kwargs):
        params = {"prompt": PLAIN, "negative_prompt": "blurry", "steps": 2, "seed": 3, **kwargs}
        return generate_with(self.script_module, pg_args, **params)[0]

    def text_encoders(self):
        return self.model.forge_objects.clip.cond_stage_model

    def patch_state(self):
        objects = self.model.forge_objects
        if self.fork == "forge":
            return [(k, sorted(p)) for patcher in (objects.unet, objects.clip.patcher) for k, p in patcher.lora_patches.items()]
        return [(key, [id(e) for e in entries]) for patcher in (objects.unet, objects.clip.patcher)
                for key, entries in sorted(patcher.patches.items())]

    def fingerprint(self):
        return (module_state_fingerprint(self.model.model.diffusion_model), module_state_fingerprint(self.text_encoders()),
                module_state_fingerprint(self.model.inner))

    def write_lora(self, path, rank=4, seed=5):
        """A kohya SDXL LoRA with UNet, te1 and te2 layers (attention projections), registered with the fork."""
        from safetensors.torch import save_file

        generator = torch.Generator().manual_seed(seed)
        objects = self.model.forge_objects
        names = {**unet_keys(objects.unet.model), **clip_keys(self.text_encoders())}
        chosen = {n: k for n, k in names.items() if ("attn1_to_" in n or "attn2_to_q" in n or "self_attn_" in n)}
        assert any(n.startswith("lora_te1_") for n in chosen) and any(n.startswith("lora_te2_") for n in chosen)
        tensors = {}
        state = {**{f"diffusion_model.{k}": v for k, v in objects.unet.model.diffusion_model.state_dict().items()},
                 **self.text_encoders().state_dict()}
        for name, key in sorted(chosen.items()):
            weight = state[key.replace("token_embedding.weight", "token_embedding.wrapped.weight")] if key not in state else state[key]
            out_dim, in_dim = weight.shape[0], weight.shape[1]
            tensors[f"{name}.lora_down.weight"] = torch.randn(rank, in_dim, generator=generator) * 0.3
            tensors[f"{name}.lora_up.weight"] = torch.randn(out_dim, rank, generator=generator) * 0.3
            tensors[f"{name}.alpha"] = torch.tensor(float(rank))
        save_file(tensors, str(path))
        self.networks.register(path)
        return chosen


@pytest.fixture(params=sorted(FORKS))
def xl(request, tmp_path, monkeypatch):
    module, path, forget, *_ = FORKS[request.param]
    getattr(module, forget)()
    monkeypatch.syspath_prepend(path)
    importlib.invalidate_caches()
    env = XLEnv(request.param, tmp_path, monkeypatch)
    yield env
    env.adapter.CONTROLLER.shutdown()
    shared.reset()
    getattr(module, forget)()


def test_weak_weights_are_keyed_in_the_forks_own_space(xl):
    xl.generate(pg(0.3))
    weak = xl.adapter.CONTROLLER.cache.weak
    assert weak.live_family == "SDXL" and weak.unet and weak.text
    text_modules = {id(m): n for n, m in xl.text_encoders().named_modules()}
    names = {text_modules[id(layer.module)] for layer in weak.text if id(layer.module) in text_modules}
    assert any(n.startswith("clip_l.transformer.text_model.") for n in names)
    assert any(".self_attn.q_proj" in n and n.startswith("clip_g.") for n in names)  # OpenCLIP's fused attention, split by the fork
    if xl.fork == "forge":
        assert "clip_g.transformer.text_projection" in names  # a Linear
    else:
        owners = [layer for layer in weak.text if "text_projection" in layer.names]
        # the bare Parameter on clip_g, and its second registration on the front end's embedder
        assert {type(layer).__name__ for layer in owners} == {"WeakLayer", "AliasedLayer"}
        assert any(layer.module is xl.model.conditioner.embedders[1].wrapped for layer in owners)


def test_omega_one_is_off_bit_for_bit_and_the_model_is_unchanged(xl):
    before, patches = xl.fingerprint(), xl.patch_state()
    plain = xl.generate()
    assert same_images(plain, xl.generate(pg(1.0)))
    guided = xl.generate(pg(0.3))
    assert not same_images(plain, guided)
    assert xl.fingerprint() == before and xl.patch_state() == patches
    with pytest.raises(PGError, match="unknown base checkpoint"):
        xl.generate(pg(0.3, base="nope"))
    assert xl.fingerprint() == before and xl.patch_state() == patches
    assert same_images(plain, xl.generate())


def test_omega_zero_at_cfg_zero_is_the_base_checkpoint_as_the_fork_loads_it(xl, monkeypatch):
    """CFG Scale 0: the image is the unconditional branch alone; at ω = 0 that is the base's UNet and
    both of its text encoders as the fork converts them: context and pooled vector."""
    monkeypatch.setattr(xl.samplers, "MEMORY_CHUNKS", 1)  # the unconditional chunk in a call of its own
    vectors = []
    unet = xl.model.model.diffusion_model
    handle = unet.register_forward_pre_hook(lambda m, a, k: vectors.append(k["y"].clone()), with_kwargs=True)
    guided = xl.generate(pg(0.0), cfg_scale=0.0)
    handle.remove()
    active = xl.generate(cfg_scale=0.0)
    with torch.no_grad():
        live_pooled = xl.model.get_learned_conditioning(["blurry"])["vector"][:, :32]  # bigG's projected pooled output
    xl.load("xlbase", xl.base_inner)
    base = xl.generate(cfg_scale=0.0)
    assert not same_images(active, base)
    torch.testing.assert_close(guided.images[0], base.images[0], rtol=0, atol=1e-6)
    # the weak rows' pooled vector is the base's: the projection was swapped where the front end reads it
    with torch.no_grad():
        pooled = xl.model.get_learned_conditioning(["blurry"])["vector"][:, :32]
    assert not torch.allclose(pooled, live_pooled)
    assert any(torch.allclose(v[:1, :32], pooled, rtol=1e-5, atol=1e-6) for v in vectors)


def test_lora_te1_te2_unet_stripped_at_omega_zero_is_the_prompt_without_it(xl, tmp_path, monkeypatch):
    monkeypatch.setattr(xl.samplers, "MEMORY_CHUNKS", 1)
    chosen = xl.write_lora(tmp_path / "xl.safetensors")
    patches = xl.patch_state()
    with_lora = xl.generate(prompt=DOG, cfg_scale=0.0)
    without = xl.generate(cfg_scale=0.0)
    assert not same_images(with_lora, without)
    assert same_images(xl.generate(strip(1.0), prompt=DOG, cfg_scale=0.0), with_lora)
    stripped = xl.generate(strip(0.0), prompt=DOG, cfg_scale=0.0)
    torch.testing.assert_close(stripped.images[0], without.images[0], **CLOSE)
    weak = xl.adapter.CONTROLLER.cache.weak
    corrected_text = [layer for layer in weak.text if layer.corrections_only]
    text_modules = {id(m): n for n, m in xl.text_encoders().named_modules()}
    encoders = {text_modules[id(layer.module)].split(".")[0] for layer in corrected_text}
    assert encoders == {"clip_l", "clip_g"}, encoders  # low-rank corrections, no copies, in both text encoders
    assert len(weak.text) == sum(1 for n in chosen if n.startswith("lora_te"))
    assert weak.extra_bytes < sum(p.numel() * p.element_size() for p in xl.text_encoders().parameters()) / 4
    # the fork's own LoRA state and images as before (it merges and unmerges the LoRA itself)
    assert same_images(xl.generate(prompt=DOG, cfg_scale=0.0), with_lora) and same_images(xl.generate(cfg_scale=0.0), without)
    assert xl.patch_state() == patches


def test_lean_is_within_budget_and_closer_to_exact_than_cfg(xl, monkeypatch):
    monkeypatch.setattr(xl.samplers, "MEMORY_CHUNKS", 1)
    exact = xl.generate(pg(0.0, weights="exact"), cfg_scale=0.0)
    exact_bytes = xl.adapter.CONTROLLER.cache.weak.extra_bytes
    plain = xl.generate(cfg_scale=0.0)
    before = xl.fingerprint()
    lean = xl.generate(pg(0.0, weights="lean", lean_budget_mb=2), cfg_scale=0.0)
    weak = xl.adapter.CONTROLLER.cache.weak
    assert "PG weights: \"low-rank 2 MiB" in lean.infotexts[0], lean.infotexts[0]
    unet_bytes = sum(layer.nbytes() for layer in weak.unet)
    assert unet_bytes <= 2 * 2**20
    assert weak.text and weak.extra_bytes < exact_bytes
    to_exact = (lean.images[0] - exact.images[0]).abs().mean()
    cfg_to_exact = (plain.images[0] - exact.images[0]).abs().mean()
    assert to_exact < cfg_to_exact
    assert xl.fingerprint() == before
    # a budget that holds the exact copy gives the exact weights' image
    whole = xl.generate(pg(0.0, weights="lean", lean_budget_mb=1000), cfg_scale=0.0)
    torch.testing.assert_close(whole.images[0], exact.images[0], rtol=0, atol=1e-6)


class ForgeLinear(torch.nn.Module):
    """Forge's own Linear (backend/operations.py ForgeOperations.Linear @ dfdcbab6): a plain nn.Module,
    not an nn.Linear, whose forward is F.linear of its weight and bias (no cast on the CPU)."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


class ReForgeLinear(torch.nn.Linear):
    """reForge's own Linear (ldm_patched/modules/ops.py disable_weight_init.Linear @ 3b56b268): an
    nn.Linear subclass, nn.Linear's forward when it does not cast."""


ForgeLinear.__name__ = ReForgeLinear.__name__ = "Linear"
FORK_LINEAR = {"forge": ForgeLinear, "reforge": ReForgeLinear}


def test_lean_corrects_the_forks_own_linear_layers(xl, monkeypatch):
    """The forks build their UNets from their own layer classes, not torch's nn.Linear: lean factors of
    those layers are still corrections within the budget (not copies of the whole layer)."""
    monkeypatch.setattr(xl.samplers, "MEMORY_CHUNKS", 1)
    unet = xl.model.forge_objects.unet.model.diffusion_model
    swapped = [m for m in unet.modules() if type(m) is torch.nn.Linear]
    assert swapped
    for module in swapped:
        module.__class__ = FORK_LINEAR[xl.fork]
    exact = xl.generate(pg(0.0, weights="exact"), cfg_scale=0.0)
    plain = xl.generate(cfg_scale=0.0)
    before = xl.fingerprint()
    lean = xl.generate(pg(0.0, weights="lean", lean_budget_mb=2), cfg_scale=0.0)
    weak = xl.adapter.CONTROLLER.cache.weak
    assert sum(layer.nbytes() for layer in weak.unet) <= 2 * 2**20
    linear = [layer for layer in weak.unet if type(layer.module) is FORK_LINEAR[xl.fork]]
    assert linear and all(layer.corrections_only for layer in linear)
    assert (lean.images[0] - exact.images[0]).abs().mean() < (plain.images[0] - exact.images[0]).abs().mean()
    assert xl.fingerprint() == before


def test_lean_refusals(xl, tmp_path):
    xl.write_lora(tmp_path / "xl.safetensors")
    with pytest.raises(PGError, match="lean weak weights .* with LoRAs in the prompt"):
        xl.generate(pg(0.3, weights="lean"), prompt=DOG)
    with pytest.raises(PGError, match="cannot be combined with LoRAs to strip"):
        xl.generate(pg(0.3, weights="lean", strip_loras=True), prompt=DOG)


def test_other_families_are_refused_by_name(xl, monkeypatch):
    if xl.fork == "forge":
        monkeypatch.setattr(xl.model, "__class__", type("StableDiffusionXLRefiner", (type(xl.model),), {}))
        expected = "StableDiffusionXLRefiner"
    else:
        supported = importlib.import_module("ldm_patched.modules.supported_models")
        monkeypatch.setattr(xl.model.forge_objects.unet.model, "model_config", supported.SDXLRefiner())
        expected = "SDXLRefiner"
    with pytest.raises(PGError, match=f"family \\({expected}\\) is not supported"):
        xl.generate(pg(0.3))


@pytest.mark.parametrize("fork", ["forge", "reforge"])
def test_lean_on_sd1_too(fork, request):
    """Lean weights on the forks are not SDXL's alone: an SD 1.x fine-tune gets UNet factors within
    the budget, closer to exact than CFG."""
    from tests.test_script import pg_args

    env = request.getfixturevalue(fork)
    exact, _ = env.generate(pg_args(0.0, weights="exact"), cfg_scale=0.0)
    exact_bytes = env.adapter.CONTROLLER.cache.weak.extra_bytes
    plain, _ = env.generate(cfg_scale=0.0)
    lean, _ = env.generate(pg_args(0.0, weights="lean", lean_budget_mb=0.5), cfg_scale=0.0)
    weak = env.adapter.CONTROLLER.cache.weak
    assert "low-rank 0.5 MiB" in lean.infotexts[0], lean.infotexts[0]  # a sub-MiB budget prints as a size
    assert sum(layer.nbytes() for layer in weak.unet) <= 0.5 * 2**20 < exact_bytes
    assert (lean.images[0] - exact.images[0]).abs().mean() < (plain.images[0] - exact.images[0]).abs().mean()
