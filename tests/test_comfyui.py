"""The ComfyUI node against a fake of the ComfyUI pieces it hooks (tests/fake_comfyui, mirroring
Comfy-Org/ComfyUI v0.3.64), with tiny random SD 1.x models: the identities, LoRA stripping, the weak
text encoder, refusals, and the user's model left as found."""

import importlib.util
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE = os.path.join(HERE, "fake_comfyui")
if FAKE not in sys.path:
    sys.path.insert(0, FAKE)

import comfy.model_base  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.samplers  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402

from lib_pg.errors import PGError  # noqa: E402
from lib_pg.hosts.comfyui import guidance  # noqa: E402
from lib_pg.hosts.comfyui.nodes import (NODE_CLASS_MAPPINGS, PersonalizationGuidance,  # noqa: E402
                                        PersonalizationGuidanceTextEncode)
from lib_pg.patching import module_state_fingerprint  # noqa: E402
from tests.helpers import fine_tune  # noqa: E402
from tests.ldm_models import encode_prompts, make_sd1  # noqa: E402

SIGMAS = torch.tensor([14.6, 6.0, 2.5, 0.9, 0.0])
PROMPT, NEGATIVE = "a photo of sks dog", "blurry"


class Checkpoint:
    """A loaded checkpoint as ComfyUI holds it: a MODEL (ModelPatcher over BaseModel) and a CLIP."""

    def __init__(self, ldm):
        self.ldm = ldm
        self.model = comfy.model_patcher.ModelPatcher(comfy.model_base.BaseModel(ldm.model.diffusion_model), "cpu", "cpu")
        self.clip = comfy.sd.CLIP(ldm.cond_stage_model, tokenizer=encode_prompts)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread, or a shared CPU's other jobs make torch's threads wait on each other (20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair(one_thread):
    base = make_sd1("tiny", seed=0)
    return Checkpoint(base), Checkpoint(fine_tune(base, text_encoder=True))


@pytest.fixture(autouse=True)
def fresh_state():
    comfy.model_management.unload_all_models()
    guidance.CACHE.clear()
    folder_paths.FILES["checkpoints"].clear()
    yield
    comfy.model_management.unload_all_models()
    guidance.CACHE.clear()


def encode(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def sample(model, positive, negative, cfg, seed=0, guider=None):
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
    if guider is None:
        guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    with torch.no_grad():
        return guider.sample(noise, None, comfy.samplers.KSAMPLER(), SIGMAS, seed=seed)


def pg(model, reference=None, base_checkpoint="None", **settings):
    values = {"omega": 0.5, "schedule": "constant", "omega_end": 0.5, "start": 0.0, "end": 1.0, "weights": "auto", **settings}
    return PersonalizationGuidance().apply(model, base_checkpoint=base_checkpoint, reference_model=reference, **values)[0]


def weak_negative(clip, reference_clip, text=NEGATIVE):
    return PersonalizationGuidanceTextEncode().encode(text, clip, reference_clip)[0]


def lora_delta(module, seed=5, scale=0.05):
    """A "LoRA" on every attention/feed-forward Linear of the UNet, as ComfyUI's diff patches."""
    generator = torch.Generator().manual_seed(seed)
    return {f"diffusion_model.{name}.weight": (torch.randn(m.weight.shape, generator=generator) * scale,)
            for name, m in module.diffusion_model.named_modules() if isinstance(m, torch.nn.Linear) and "transformer" in name}


# -- the identities ---------------------------------------------------------------

def test_omega_1_is_cfg_bit_for_bit(pair):
    base, tuned = pair
    positive, negative = encode(tuned.clip, PROMPT), encode(tuned.clip, NEGATIVE)
    plain = sample(tuned.model, positive, negative, cfg=5.0)
    guided = sample(pg(tuned.model, reference=base.model, omega=1.0), positive, weak_negative(tuned.clip, base.clip), cfg=5.0)
    assert torch.equal(plain, guided)


def test_omega_0_at_cfg_0_is_the_reference_model_and_text_encoder(pair):
    base, tuned = pair
    reference = sample(base.model, encode(base.clip, PROMPT), encode(base.clip, NEGATIVE), cfg=0.0)
    guided = sample(pg(tuned.model, reference=base.model, omega=0.0), encode(tuned.clip, PROMPT),
                    weak_negative(tuned.clip, base.clip), cfg=0.0)
    assert torch.allclose(guided, reference, atol=1e-4, rtol=1e-5)
    without_weak_text = sample(pg(tuned.model, reference=base.model, omega=0.0), encode(tuned.clip, PROMPT),
                               encode(tuned.clip, NEGATIVE), cfg=0.0)
    assert not torch.allclose(without_weak_text, reference, atol=1e-4, rtol=0)  # the fine-tuned text encoder matters


def test_a_base_checkpoint_from_the_list_is_loaded_only_to_build(pair):
    base, tuned = pair
    loads = []
    folder_paths.FILES["checkpoints"]["base.safetensors"] = "/models/base.safetensors"
    comfy.sd.CHECKPOINTS["/models/base.safetensors"] = lambda: loads.append(1) or (base.model, None, None, None)
    guidance.file_identity = lambda path: (path, 1, 1.0)  # the fake file has no size or mtime
    reference = sample(base.model, encode(base.clip, PROMPT), encode(base.clip, NEGATIVE), cfg=0.0)
    guided_model = pg(tuned.model, base_checkpoint="base.safetensors", omega=0.0)
    for _ in range(2):
        guided = sample(guided_model, encode(tuned.clip, PROMPT), weak_negative(tuned.clip, base.clip), cfg=0.0)
        assert torch.allclose(guided, reference, atol=1e-4, rtol=1e-5)
    assert loads == [1]  # the weak weights were kept for the second run


def test_intermediate_omega_is_the_interpolated_model(pair):
    base, tuned = pair
    omega = 0.4
    weak_ldm = make_sd1("tiny", seed=0)
    with torch.no_grad():
        for p_weak, p_base, p_tuned in zip(weak_ldm.parameters(), base.ldm.parameters(), tuned.ldm.parameters()):
            p_weak.copy_(torch.lerp(p_base, p_tuned, omega))
    weak = Checkpoint(weak_ldm)
    expected = sample(weak.model, encode(weak.clip, PROMPT), encode(weak.clip, NEGATIVE), cfg=0.0)
    guided = sample(pg(tuned.model, reference=base.model, omega=omega), encode(tuned.clip, PROMPT),
                    weak_negative(tuned.clip, base.clip), cfg=0.0)
    assert torch.allclose(guided, expected, atol=1e-4, rtol=1e-5)


def test_a_stripped_lora_runs_at_omega_times_its_strength(pair):
    base, _tuned = pair
    delta, strength, omega = lora_delta(base.model.model), 0.8, 0.5
    with_lora = base.model.clone()
    with_lora.add_patches(delta, strength)
    at_omega = base.model.clone()
    at_omega.add_patches(delta, omega * strength)
    positive, negative = encode(base.clip, PROMPT), encode(base.clip, NEGATIVE)
    expected = sample(at_omega, positive, negative, cfg=0.0)
    guided = sample(pg(with_lora, reference=base.model, omega=omega), positive, weak_negative(base.clip, base.clip), cfg=0.0)
    assert torch.allclose(guided, expected, atol=1e-4, rtol=1e-5)
    plain = sample(with_lora, positive, negative, cfg=5.0)
    assert torch.equal(sample(pg(with_lora, reference=base.model, omega=1.0), positive, negative, cfg=5.0), plain)


def test_a_lora_with_text_encoder_layers_is_stripped_from_the_weak_negative(pair):
    base, _tuned = pair
    generator = torch.Generator().manual_seed(9)
    text_delta = {name: (torch.randn(p.shape, generator=generator) * 0.05,)
                  for name, p in base.clip.cond_stage_model.named_parameters() if name.endswith("fc1.weight")}
    clip = base.clip.clone()
    clip.add_patches(text_delta, 1.0)
    model = base.model.clone()
    model.add_patches(lora_delta(base.model.model), 1.0)
    expected = sample(base.model, encode(base.clip, PROMPT), encode(base.clip, NEGATIVE), cfg=0.0)
    guided = sample(pg(model, reference=base.model, omega=0.0), encode(clip, PROMPT), weak_negative(clip, base.clip), cfg=0.0)
    assert torch.allclose(guided, expected, atol=1e-4, rtol=1e-5)
    half_clip = base.clip.clone()
    half_clip.add_patches(text_delta, 0.5)
    text = weak_negative(clip, base.clip)[0][1][PersonalizationGuidanceTextEncode and "personalization_guidance_weak_text"]
    assert torch.allclose(text.at(0.5)[0], encode(half_clip, NEGATIVE)[0][0], atol=1e-4, rtol=1e-5)


def test_the_unconditional_chunk_in_a_call_of_its_own_is_routed(pair):
    base, tuned = pair
    positive, negative = encode(tuned.clip, PROMPT), weak_negative(tuned.clip, base.clip)
    batched = sample(pg(tuned.model, reference=base.model, omega=0.3), positive, negative, cfg=5.0)
    separate_model = pg(tuned.model, reference=base.model, omega=0.3)
    separate_model.model_options["fake_max_chunks_per_call"] = 1
    separate = sample(separate_model, positive, negative, cfg=5.0)
    assert torch.allclose(batched, separate, atol=1e-4, rtol=1e-5)
    assert not torch.allclose(batched, sample(tuned.model, positive, encode(tuned.clip, NEGATIVE), cfg=5.0), atol=1e-4)


def test_a_schedule_changes_omega_over_the_steps(pair):
    base, tuned = pair
    positive, negative = encode(tuned.clip, PROMPT), weak_negative(tuned.clip, base.clip)
    constant = sample(pg(tuned.model, reference=base.model, omega=0.3), positive, negative, cfg=5.0)
    flat = sample(pg(tuned.model, reference=base.model, omega=0.3, schedule="linear", omega_end=0.3), positive, negative, cfg=5.0)
    assert torch.equal(constant, flat)
    moving = sample(pg(tuned.model, reference=base.model, omega=0.3, schedule="linear", omega_end=0.9), positive, negative, cfg=5.0)
    assert not torch.equal(constant, moving)
    assert guidance.step_of(SIGMAS, SIGMAS[2].reshape(1)) == (2, 4)
    assert guidance.step_of(SIGMAS, torch.tensor([4.0])) == (1, 4)  # between steps 1 and 2: a second-order sampler's midpoint


def test_progress_is_shown_while_building(pair):
    base, tuned = pair
    comfy.utils.UPDATES.clear()
    sample(pg(tuned.model, reference=base.model, omega=0.5), encode(tuned.clip, PROMPT), encode(tuned.clip, NEGATIVE), cfg=5.0)
    assert comfy.utils.UPDATES and comfy.utils.UPDATES[-1][0] == comfy.utils.UPDATES[-1][1]


# -- the user's model ---------------------------------------------------------------

def test_the_model_is_left_as_found_after_success_and_error(pair):
    base, tuned = pair
    unet = tuned.model.model.diffusion_model
    before = module_state_fingerprint(unet)
    wrappers_before = {k: dict(v) for k, v in tuned.model.wrappers.items()}
    guided = pg(tuned.model, reference=base.model, omega=0.5)
    assert tuned.model.wrappers == wrappers_before  # the wrappers live on the clone only
    sample(guided, encode(tuned.clip, PROMPT), weak_negative(tuned.clip, base.clip), cfg=5.0)
    assert module_state_fingerprint(unet) == before

    class Stop(Exception):
        pass

    noise = torch.randn((1, 4, 8, 8))
    guider = comfy.samplers.CFGGuider(guided)
    guider.set_conds(encode(tuned.clip, PROMPT), weak_negative(tuned.clip, base.clip))
    guider.set_cfg(5.0)

    def stop(*_args):
        raise Stop

    with pytest.raises(Stop), torch.no_grad():
        guider.sample(noise, None, comfy.samplers.KSAMPLER(), SIGMAS, callback=stop)
    assert module_state_fingerprint(unet) == before


def test_a_lora_model_is_left_as_comfyui_loaded_it(pair):
    base, _tuned = pair
    with_lora = base.model.clone()
    with_lora.add_patches(lora_delta(base.model.model), 0.8)
    positive, negative = encode(base.clip, PROMPT), encode(base.clip, NEGATIVE)
    sample(with_lora, positive, negative, cfg=5.0)
    loaded = module_state_fingerprint(base.model.model.diffusion_model)
    loaded_weights = {k: v.clone() for k, v in base.model.model.diffusion_model.state_dict().items()}
    sample(pg(with_lora, reference=base.model, omega=0.2), positive, weak_negative(base.clip, base.clip), cfg=5.0)
    assert module_state_fingerprint(base.model.model.diffusion_model)[1] == loaded[1]  # no hook, no forward left
    comfy.model_management.unload_all_models()
    sample(with_lora, positive, negative, cfg=5.0)  # loaded again: new Parameter objects (ComfyUI's set_attr_param)
    weights = base.model.model.diffusion_model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in loaded_weights.items())


# -- refusals ---------------------------------------------------------------------------

def test_refusals_name_the_cause(pair):
    base, tuned = pair
    with pytest.raises(PGError, match="pick a base_checkpoint"):
        pg(tuned.model)
    folder_paths.FILES["checkpoints"]["base.safetensors"] = "/models/base.safetensors"
    with pytest.raises(PGError, match="not both"):
        pg(tuned.model, reference=base.model, base_checkpoint="base.safetensors")
    with pytest.raises(PGError, match="'start'"):
        pg(tuned.model, reference=base.model, start=0.8, end=0.2)
    with pytest.raises(PGError, match="same UNet weights"):
        sample(pg(tuned.model, reference=tuned.model), encode(tuned.clip, PROMPT), encode(tuned.clip, NEGATIVE), cfg=5.0)


def test_a_guider_whose_index_1_is_not_uncond_is_refused(pair):
    base, tuned = pair

    class DualCFGGuider(comfy.samplers.CFGGuider):
        def predict_noise(self, x, timestep, model_options={}, seed=None):
            raise AssertionError("PG must refuse before sampling")

    guided = pg(tuned.model, reference=base.model)
    with pytest.raises(PGError, match="DualCFGGuider"):
        sample(guided, encode(tuned.clip, PROMPT), encode(tuned.clip, NEGATIVE), cfg=5.0, guider=DualCFGGuider(guided))


def test_hooks_and_low_vram_lora_in_forward_are_refused(pair):
    base, tuned = pair
    guided = pg(tuned.model, reference=base.model)
    hooked = [[encode(tuned.clip, NEGATIVE)[0][0], {"hooks": object()}]]
    with pytest.raises(PGError, match="hooks"):
        sample(guided, encode(tuned.clip, PROMPT), hooked, cfg=5.0)
    layer = next(m for m in tuned.model.model.diffusion_model.modules() if isinstance(m, torch.nn.Linear))
    layer.weight_function = [lambda weight: weight]
    try:
        with pytest.raises(PGError, match="low-VRAM"):
            sample(guided, encode(tuned.clip, PROMPT), encode(tuned.clip, NEGATIVE), cfg=5.0)
    finally:
        del layer.weight_function


def test_distilled_and_unsupported_families_are_refused_by_name(pair):
    _base, tuned = pair

    class Flux(torch.nn.Module):
        pass

    class QwenImage(torch.nn.Module):
        pass

    class HunyuanVideo(torch.nn.Module):
        pass

    class Chroma(Flux):  # comfy/model_base.py: Chroma subclasses Flux, but samples with real CFG
        pass

    for cls, message in ((Flux, "Flux .dev/schnell. is guidance-distilled"), (HunyuanVideo, "HunyuanVideo is guidance-distilled"),
                         (QwenImage, "QwenImage is not supported in ComfyUI yet"), (Chroma, "Chroma is not supported")):
        patcher = comfy.model_patcher.ModelPatcher(cls(), "cpu", "cpu")
        with pytest.raises(PGError, match=message):
            pg(patcher, reference=tuned.model)


def test_sd3_is_a_supported_family(pair):
    """SD 3/3.5 (comfy/model_base.py SD3, an MMDiT) is routed like the UNet: tests/e2e/test_comfyui_dit_e2e.py
    runs it in a real ComfyUI; here the family check lets its class through, and the routing runs on it."""
    base, tuned = pair

    class SD3(comfy.model_base.BaseModel):
        pass

    def as_sd3(checkpoint):
        return comfy.model_patcher.ModelPatcher(SD3(checkpoint.model.model.diffusion_model), "cpu", "cpu")

    positive, negative = encode(tuned.clip, PROMPT), encode(tuned.clip, NEGATIVE)
    live = as_sd3(tuned)
    plain = sample(live, positive, negative, cfg=5.0)
    assert torch.equal(sample(pg(live, reference=as_sd3(base), omega=1.0), positive, negative, cfg=5.0), plain)
    assert not torch.equal(sample(pg(live, reference=as_sd3(base), omega=0.3), positive, negative, cfg=5.0), plain)


# -- the entry point -----------------------------------------------------------------------

def load_root_init(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(HERE), "__init__.py"),
                                                  submodule_search_locations=[os.path.dirname(HERE)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_root_init_registers_the_nodes_in_comfyui_only(monkeypatch):
    loaded = load_root_init("/custom_nodes/personalization_guidance")  # ComfyUI names it by its path
    assert set(loaded.NODE_CLASS_MAPPINGS) == set(NODE_CLASS_MAPPINGS) == {"PersonalizationGuidance", "PersonalizationGuidanceTextEncode"}
    assert loaded.NODE_DISPLAY_NAME_MAPPINGS["PersonalizationGuidance"] == "Personalization Guidance"
    monkeypatch.delitem(sys.modules, "folder_paths")
    elsewhere = load_root_init("repository_root")  # e.g. pytest collecting tests/ as a sub-package
    assert elsewhere.NODE_CLASS_MAPPINGS == {}


def test_the_example_workflows_use_the_nodes_as_they_are_defined():
    import json

    folder = os.path.join(os.path.dirname(HERE), "example_workflows")
    names = sorted(os.listdir(folder))
    assert names
    for name in names:
        workflow = json.load(open(os.path.join(folder, name)))
        nodes = {node["id"]: node for node in workflow["nodes"]}
        for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
            assert nodes[src]["outputs"][src_slot]["type"] == kind == nodes[dst]["inputs"][dst_slot]["type"]
            assert nodes[dst]["inputs"][dst_slot]["link"] == link_id
        for node in nodes.values():
            cls = NODE_CLASS_MAPPINGS.get(node["type"])
            if cls is None:
                continue  # one of ComfyUI's own nodes
            spec = cls.INPUT_TYPES()
            inputs = {**spec["required"], **spec.get("optional", {})}
            widgets = [n for n, (kind, *_rest) in inputs.items() if isinstance(kind, list) or kind in ("FLOAT", "INT", "STRING", "BOOLEAN")]
            sockets = {n for n in inputs if n not in widgets}
            assert len(node["widgets_values"]) == len(widgets), (name, node["type"])
            assert {i["name"] for i in node["inputs"]} <= sockets
        assert any(node["type"] == "PersonalizationGuidance" for node in nodes.values())


# -- SDXL: two text encoders, a pooled vector in `y` ------------------------------------------

class SDXLText(torch.nn.Module):
    """SDXL's two text encoders as ComfyUI's SDXL CLIP returns them: CLIP-L's and bigG's penultimate
    hidden states side by side, and bigG's pooled output."""

    def __init__(self, conditioner):
        super().__init__()
        self.clip_l, self.clip_g = conditioner.embedders[0], conditioner.embedders[1]

    def forward(self, tokens):
        l_hidden = self.clip_l.hidden_states(tokens["l"])[-2]
        g_hidden, pooled = self.clip_g(tokens["g"])
        return torch.cat([l_hidden, g_hidden], dim=2), pooled


class SDXLCheckpoint:
    def __init__(self, ldm):
        e = ldm.conditioner.embedders
        self.model = comfy.model_patcher.ModelPatcher(comfy.model_base.SDXL(ldm.model.diffusion_model, list(e[2:])), "cpu", "cpu")
        self.clip = comfy.sd.CLIP(SDXLText(ldm.conditioner),
                                  tokenizer=lambda text: {"l": encode_prompts(text), "g": encode_prompts(text, pad_token=0)})


def test_sdxl_weak_branch_gets_the_weak_pooled_vector(one_thread):
    from tests.ldm_models import make_sdxl

    base_ldm = make_sdxl("tiny", seed=0)
    base, tuned = SDXLCheckpoint(base_ldm), SDXLCheckpoint(fine_tune(base_ldm, text_encoder=True))
    positive = encode(tuned.clip, PROMPT)
    plain = sample(tuned.model, positive, encode(tuned.clip, NEGATIVE), cfg=5.0)
    assert torch.equal(sample(pg(tuned.model, reference=base.model, omega=1.0), positive, weak_negative(tuned.clip, base.clip),
                              cfg=5.0), plain)
    reference = sample(base.model, encode(base.clip, PROMPT), encode(base.clip, NEGATIVE), cfg=0.0)
    guided = sample(pg(tuned.model, reference=base.model, omega=0.0), positive, weak_negative(tuned.clip, base.clip), cfg=0.0)
    assert torch.allclose(guided, reference, atol=1e-4, rtol=1e-5)


# -- Automatic base and lean weights: real checkpoint files in the (fake) checkpoints folder ------------------

def register_files(folder, **ldms):
    """Write each ldm model as a checkpoint file, list it in ComfyUI's checkpoints folder, and let the fake
    loader build its MODEL; models_dir (PG's lean cache under it) in `folder`."""
    from tests.ldm_models import save_checkpoint

    folder_paths.models_dir = str(folder / "models")
    paths = {}
    for name, ldm in ldms.items():
        path = str(folder / f"{name}.safetensors")
        if not os.path.isfile(path):
            save_checkpoint(ldm.state_dict(), path)
        folder_paths.FILES["checkpoints"][f"{name}.safetensors"] = path
        comfy.sd.CHECKPOINTS[path] = lambda ldm=ldm: (Checkpoint(ldm).model, None, None, None)
        paths[name] = path
    return paths


@pytest.fixture(scope="module")
def decoy(one_thread):
    return make_sd1("tiny", seed=2)


def test_automatic_base_picks_the_nearest_other_checkpoint(pair, decoy, tmp_path):
    base, tuned = pair
    register_files(tmp_path, base=base.ldm, tuned=tuned.ldm, decoy=decoy)
    assert [name for name, _path, _d in guidance.files.ranking(tuned.model)][:2] == ["tuned.safetensors", "base.safetensors"]
    assert guidance.files.model_file(tuned.model)[0] == "tuned.safetensors"  # the model's own file, found by its weights
    reference = sample(base.model, encode(base.clip, PROMPT), encode(base.clip, NEGATIVE), cfg=0.0)
    guided = sample(pg(tuned.model, base_checkpoint="Automatic", omega=0.0), encode(tuned.clip, PROMPT),
                    weak_negative(tuned.clip, base.clip), cfg=0.0)
    assert torch.allclose(guided, reference, atol=1e-4, rtol=1e-5)
    assert "Automatic" in PersonalizationGuidance.INPUT_TYPES()["required"]["base_checkpoint"][0]


def test_automatic_base_refuses_unrelated_checkpoints(pair, decoy, tmp_path):
    _base, tuned = pair
    register_files(tmp_path, tuned=tuned.ldm, decoy=decoy)
    with pytest.raises(PGError, match="no plausible base"):
        pg(tuned.model, base_checkpoint="Automatic")
    folder_paths.FILES["checkpoints"].pop("decoy.safetensors")
    with pytest.raises(PGError, match="no other checkpoint"):
        pg(tuned.model, base_checkpoint="Automatic")


@pytest.fixture(scope="module")
def low_rank_pair(pair):
    from tests.test_lean import low_rank_tune

    base, _tuned = pair
    return base, Checkpoint(low_rank_tune(base.ldm))


def exact_unet_bytes(paths, element_size=4):
    from lib_pg import checkpoints, lowrank
    from lib_pg.lean_plan import UNetPart

    with checkpoints.open_checkpoint(paths["tuned"]) as a, checkpoints.open_checkpoint(paths["base"]) as b:
        return lowrank.estimated_differing_bytes(UNetPart(a), UNetPart(b), element_size)


def test_lean_weights_are_factored_once_cached_in_webuis_format_and_give_the_base(low_rank_pair, tmp_path, monkeypatch):
    from lib_pg import lowrank

    base, tuned = low_rank_pair
    paths = register_files(tmp_path, base=base.ldm, tuned=tuned.ldm)
    budget_mb = exact_unet_bytes(paths) / 2 / 2**20
    positive, negative = encode(base.clip, PROMPT), encode(base.clip, NEGATIVE)
    reference = sample(base.model, positive, negative, cfg=0.0)
    lean_model = pg(tuned.model, base_checkpoint="base.safetensors", omega=0.0, weights="lean", lean_budget_mb=budget_mb)
    comfy.utils.UPDATES.clear()
    guided = sample(lean_model, positive, negative, cfg=0.0)
    assert guidance.CACHE.weak.description.startswith("low-rank")
    assert torch.allclose(guided, reference, atol=1e-3, rtol=1e-4)  # a rank-2 difference within the budget: the base
    assert comfy.utils.UPDATES and comfy.utils.UPDATES[-1][0] == 100  # factoring showed ComfyUI's progress bar
    cached = os.listdir(os.path.join(folder_paths.models_dir, "PersonalizationGuidance"))
    sha = guidance.files.sha256
    budget = int(budget_mb * 2**20)
    assert cached == [f"lean-{sha(paths['tuned'])[:12]}-{sha(paths['base'])[:12]}-{budget}B-float32-unet.safetensors"]
    assert lowrank.read_lean_metadata(os.path.join(folder_paths.models_dir, "PersonalizationGuidance", cached[0]))

    guidance.CACHE.clear()
    monkeypatch.setattr(lowrank, "factor_pair", lambda *a, **k: pytest.fail("the cached factors must be read"))
    again = sample(pg(tuned.model, base_checkpoint="base.safetensors", omega=0.0, weights="lean", lean_budget_mb=budget_mb),
                   positive, negative, cfg=0.0)
    assert torch.equal(again, guided)


def test_auto_weights_are_exact_on_a_cpu_and_lean_when_memory_is_short(low_rank_pair, tmp_path, monkeypatch):
    base, tuned = low_rank_pair
    paths = register_files(tmp_path, base=base.ldm, tuned=tuned.ldm)
    positive, negative = encode(base.clip, PROMPT), encode(base.clip, NEGATIVE)
    exact = sample(pg(tuned.model, base_checkpoint="base.safetensors", omega=0.3, weights="exact"), positive, negative, cfg=5.0)
    auto = sample(pg(tuned.model, base_checkpoint="base.safetensors", omega=0.3), positive, negative, cfg=5.0)
    assert guidance.CACHE.weak.description == "exact" and torch.equal(auto, exact)
    big = sample(pg(tuned.model, base_checkpoint="base.safetensors", omega=0.3, weights="lean", lean_budget_mb=1024.0),
                 positive, negative, cfg=5.0)
    assert guidance.CACHE.weak.description == "exact" and torch.equal(big, exact)  # a budget holding the exact copy gets it
    short = exact_unet_bytes(paths) // 4
    monkeypatch.setattr(guidance, "available_bytes", lambda _param: short)  # a GPU with little free memory
    lean = sample(pg(tuned.model, base_checkpoint="base.safetensors", omega=0.3), positive, negative, cfg=5.0)
    assert guidance.CACHE.weak.description.startswith("low-rank")
    assert torch.allclose(lean, exact, atol=1e-3, rtol=1e-4)


def test_lean_is_refused_where_there_are_no_two_files(pair, tmp_path):
    base, tuned = pair
    register_files(tmp_path, base=base.ldm)  # the model's own file is not in the list
    positive, negative = encode(tuned.clip, PROMPT), encode(tuned.clip, NEGATIVE)
    with pytest.raises(PGError, match="not in ComfyUI's checkpoints folder"):
        sample(pg(tuned.model, base_checkpoint="base.safetensors", weights="lean"), positive, negative, cfg=5.0)
    with pytest.raises(PGError, match="MODEL input"):
        sample(pg(tuned.model, reference=base.model, weights="lean"), positive, negative, cfg=5.0)
    with_lora = base.model.clone()
    with_lora.add_patches(lora_delta(base.model.model), 0.8)
    with pytest.raises(PGError, match="LoRA patches"):
        sample(pg(with_lora, base_checkpoint="base.safetensors", weights="lean"), positive, negative, cfg=5.0)
    auto = sample(pg(tuned.model, base_checkpoint="base.safetensors", omega=0.3), positive, negative, cfg=5.0)
    assert guidance.CACHE.weak.description == "exact" and auto.shape == (1, 4, 8, 8)  # auto: exact copies instead


def test_lean_factors_correct_comfyuis_linear_layers_without_a_copy():
    """ComfyUI's UNet is built from comfy.ops Linear subclasses: lean factors must stay factors there (the
    weak rows get the low-rank correction), not become full weak copies; with manual cast (bf16 weights,
    fp32 rows) the correction follows the rows' dtype."""
    import comfy.ops
    from lib_pg import lowrank
    from lib_pg.weights import live_parameters

    torch.manual_seed(0)
    for cls, dtype in ((comfy.ops.disable_weight_init.Linear, torch.float32), (comfy.ops.manual_cast.Linear, torch.bfloat16)):
        layer = cls(8, 6).to(dtype)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(6, 8))
            layer.bias.copy_(torch.randn(6))
        view = torch.nn.Module()
        view.model = torch.nn.Module()
        view.model.diffusion_model = torch.nn.Module()
        view.model.diffusion_model.proj = layer
        up, down = torch.randn(6, 2), torch.randn(2, 8)
        lean = lowrank.LeanFactors(factors={"model.diffusion_model.proj.weight": (up.to(dtype), down.to(dtype))},
                                   shapes={"model.diffusion_model.proj.weight": (6, 8)})
        weak = lowrank.build_lean_weak_model(view, lean, ("constant", 0.0), correctable=guidance.correctable_layer)
        assert len(weak.unet) == 1 and weak.unet[0].corrections_only  # a correction, no copy
        copied = lowrank.build_lean_weak_model(view, lean, ("constant", 0.0))  # torch's own classes only
        assert not copied.unet[0].corrections_only
        x = torch.randn(3, 8)
        correction = weak.unet[0].corrections[0](x)
        assert correction.dtype == x.dtype
        assert torch.allclose(correction, x @ (up.to(dtype).float() @ down.to(dtype).float()).T, atol=1e-4)
        assert "model.diffusion_model.proj.weight" in live_parameters(view)
