"""Automatic base detection: fingerprints, the closest base among decoys, refusals, the cache."""

import os

import numpy as np
import pytest
import torch

import lib_pg.checkpoints as checkpoints
from lib_pg.checkpoints import (MAX_BASE_DISTANCE, Checkpoint, FingerprintCache, closest_base, find_base,
                                fingerprint, fingerprint_distance, pick_base)
from lib_pg.errors import PGError
from tests.helpers import fine_tune
from tests.ldm_models import make_sd1, make_sdxl_like_state_dict, save_checkpoint

# fine_tune() draws its noise from seed 1, the same stream make_sd1(seed=1) draws its weights
# from: a fine-tune is then slightly correlated with the seed-1 model. Decoys use other seeds.
DECOY_SEEDS = (2, 3)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("bases")
    base = make_sd1("tiny", seed=0)
    paths = {"base": d / "base.safetensors", "tuned": d / "tuned.safetensors", "tuned_te": d / "tuned_te.safetensors",
             "xl": d / "xl.safetensors", "inpaint": d / "inpaint.safetensors", "base16": d / "base16.safetensors"}
    save_checkpoint(base.state_dict(), paths["base"])
    save_checkpoint(fine_tune(base, scale=0.02).state_dict(), paths["tuned"])
    save_checkpoint(fine_tune(base, scale=0.02, text_encoder=True).state_dict(), paths["tuned_te"])
    save_checkpoint({k: v.half() if v.is_floating_point() else v for k, v in base.state_dict().items()}, paths["base16"])
    for seed in DECOY_SEEDS:
        paths[f"decoy{seed}"] = d / f"decoy{seed}.safetensors"
        save_checkpoint(make_sd1("tiny", seed=seed).state_dict(), paths[f"decoy{seed}"])
    save_checkpoint(make_sdxl_like_state_dict("tiny"), paths["xl"])
    save_checkpoint(make_sd1("tiny", seed=0, inpainting=True).state_dict(), paths["inpaint"])
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="module")
def fps(models):
    return {name: fingerprint(path) for name, path in models.items()}


def test_fingerprint_samples_a_few_tensors_lazily(models, monkeypatch):
    def no_full_reads(self, key):
        raise AssertionError("a fingerprint must not read whole tensors")

    monkeypatch.setattr(Checkpoint, "get", no_full_reads)
    fp = fingerprint(models["base"])
    assert fp.family == "SD 1.x"
    assert 16 <= len(fp.samples) <= 32
    assert any(k.startswith("cond_stage_model.") for k in fp.samples)
    assert all(s.dtype == np.float32 and 0 < s.size <= 4096 for s in fp.samples.values())
    assert sum(s.size for s in fp.samples.values()) <= 32 * 4096
    # deterministic: the same file gives the same sample
    again = fingerprint(models["base"])
    assert list(again.samples) == list(fp.samples)
    assert all(np.array_equal(again.samples[k], fp.samples[k]) for k in fp.samples)


def test_sample_values_are_the_tensors_elements(models):
    from safetensors.torch import load_file

    state = load_file(models["base"])
    with checkpoints.open_checkpoint(models["base"]) as ckpt:
        key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
        flat = state[key].reshape(-1)
        sample = ckpt.read_sample(key, runs=4, run_length=100)
        starts = [round(i * (flat.numel() - 100) / 3) for i in range(4)]
        expected = torch.cat([flat[s:s + 100] for s in starts]).numpy()
        assert np.array_equal(sample, expected)


def test_measured_distances_separate_fine_tunes_from_unrelated_models(fps):
    related = [fingerprint_distance(fps[a], fps["base"]) for a in ("tuned", "tuned_te")]
    unrelated = [fingerprint_distance(fps[f"decoy{s}"], fps["base"]) for s in DECOY_SEEDS]
    unrelated += [fingerprint_distance(fps["tuned"], fps[f"decoy{s}"]) for s in DECOY_SEEDS]
    assert max(related) < MAX_BASE_DISTANCE / 2
    assert min(unrelated) > MAX_BASE_DISTANCE * 1.5
    assert fingerprint_distance(fps["base16"], fps["base"]) < 1e-3  # an fp16 copy is the same model


@pytest.mark.parametrize("active", ["tuned", "tuned_te"])
def test_finds_the_base_among_same_family_decoys(models, fps, active):
    candidates = [fps["decoy2"], fps["xl"], fps["base"], fps["inpaint"], fps["decoy3"], fps[active]]
    best, distance, ranking = pick_base(fps[active], candidates)
    assert best.path == models["base"]
    assert distance < MAX_BASE_DISTANCE
    assert [fp.path for fp, _ in ranking][0] == models["base"]
    ranked = {os.path.basename(fp.path) for fp, _ in ranking}
    assert ranked == {"base.safetensors", "decoy2.safetensors", "decoy3.safetensors"}  # same family only, not itself
    assert [d for _, d in ranking] == sorted(d for _, d in ranking)


def test_find_base_over_files(models):
    paths = [models["decoy2"], models["base"], models["xl"], models["tuned"], models["decoy3"]]
    best, _, _ = find_base(models["tuned"], paths + [models["tuned"] + ".missing"])
    assert best.path == models["base"]


def test_refuses_when_only_another_family_exists(fps):
    with pytest.raises(PGError) as e:
        pick_base(fps["tuned"], [fps["xl"], fps["inpaint"]])
    assert "SD 1.x" in e.value.reason and "SDXL" in e.value.reason
    assert closest_base(fps["tuned"], [fps["xl"]]) == (None, float("inf"), [])


def test_refuses_when_only_unrelated_models_exist(fps):
    with pytest.raises(PGError) as e:
        pick_base(fps["tuned"], [fps["decoy2"], fps["decoy3"]])
    assert "no plausible base" in e.value.reason and "decoy" in e.value.reason


def test_refuses_a_lora(tmp_path, fps):
    path = tmp_path / "lora.safetensors"
    save_checkpoint({"lora_unet_x_proj_in.lora_down.weight": torch.zeros(4, 32),
                     "lora_unet_x_proj_in.lora_up.weight": torch.zeros(32, 4)}, path)
    with pytest.raises(PGError, match="LoRA"):
        pick_base(fingerprint(str(path)), [fps["base"]])


def test_cache_hits_do_not_reopen_files(models, monkeypatch, tmp_path):
    opened = []
    real_open = checkpoints.open_checkpoint
    monkeypatch.setattr(checkpoints, "open_checkpoint", lambda path, *a: opened.append(path) or real_open(path, *a))
    cache = FingerprintCache()
    first = cache.get(models["base"])
    assert cache.get(models["base"]) is first
    assert opened == [models["base"]] and (cache.hits, cache.misses) == (1, 1)
    # a caller-given hash is the key: another path with the same hash is a hit
    by_hash = cache.get(models["decoy2"], file_hash="abc123")
    assert cache.get(models["decoy3"], file_hash="abc123") is by_hash
    assert opened == [models["base"], models["decoy2"]]
    # without a hash the key is (path, size, mtime): a rewritten file is read again
    path = tmp_path / "changing.safetensors"
    save_checkpoint(make_sd1("tiny", seed=4).state_dict(), path)
    cache.get(str(path))
    os.utime(path, ns=(1, 1))
    cache.get(str(path))
    assert opened.count(str(path)) == 2
    best, _, _ = find_base(models["tuned"], [models["base"], models["decoy2"]], cache=cache)
    assert best.path == models["base"]
    assert opened.count(models["base"]) == 1 and opened.count(models["decoy2"]) == 2  # decoy2 by path now


def test_ckpt_files_give_the_same_fingerprint(models, tmp_path):
    from safetensors.torch import load_file

    state = load_file(models["base"])
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v for k, v in state.items()}
    path = tmp_path / "base.ckpt"
    torch.save({"state_dict": old}, path)
    a, b = fingerprint(str(path)), fingerprint(models["base"])
    assert a.family == b.family and a.signature == b.signature and list(a.samples) == list(b.samples)
    assert fingerprint_distance(a, b) == 0.0
