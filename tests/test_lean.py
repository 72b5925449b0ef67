"""Lean weak weights (lib_pg/lowrank.py): factoring a checkpoint pair within a
budget, the file it writes, and the weak model built from it."""

import io
import math
import os
import sys
import pytest
import torch

from lib_pg import lowrank
from lib_pg.checkpoints import open_checkpoint
from lib_pg.guidance import GuidanceRun
from lib_pg.inspector import main as cli
from lib_pg.settings import PGSettings
from tests.helpers import interpolated_copy
from tests.ldm_models import make_sd1, save_checkpoint

RANK = 2


def low_rank_tune(base, rank=RANK, seed=3, scale=0.05):
    """A fine-tune whose difference has rank ≤ `rank` in every factorable
    Linear/conv weight (UNet and text encoder); everything else unchanged."""
    import copy

    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    keys = set(base.state_dict())
    with torch.no_grad():
        for key, param in tuned.named_parameters():
            if lowrank.is_embedding(lowrank.module_prefix(key)[0]):
                continue
            if lowrank.is_weak_tensor(key, param.dtype) and lowrank.is_factorable(key, tuple(param.shape), keys):
                rows, cols = param.shape[0], param[0].numel()
                up = torch.randn(rows, rank, generator=g) * scale
                down = torch.randn(rank, cols, generator=g) / math.sqrt(cols)
                param.add_((up @ down).reshape(param.shape))
    return tuned


def write_pair(tmp_path, base, tuned, name="tuned"):
    save_checkpoint(base.state_dict(), tmp_path / "base.safetensors")
    save_checkpoint(tuned.state_dict(), tmp_path / f"{name}.safetensors")
    return str(tmp_path / f"{name}.safetensors"), str(tmp_path / "base.safetensors")


def factor(active_path, base_path, budget, dtype=torch.float32):
    with open_checkpoint(active_path) as active, open_checkpoint(base_path) as base:
        return lowrank.factor_pair(active, base, budget, dtype)


def rank_budget(model, rank, element_size=4):
    keys = set(model.state_dict())
    return sum(rank * (p.shape[0] + p[0].numel()) * element_size for k, p in model.state_dict().items()
               if lowrank.is_weak_tensor(k, p.dtype) and lowrank.is_factorable(k, tuple(p.shape), keys)
               and not lowrank.is_embedding(lowrank.module_prefix(k)[0]))


@pytest.fixture(scope="module")
def low_rank_pair(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("lowrank")
    base = make_sd1("tiny", seed=0)
    tuned = low_rank_tune(base)
    active_path, base_path = write_pair(tmp_path, base, tuned)
    lean = factor(active_path, base_path, int(1.05 * rank_budget(base, RANK)))
    return base, tuned, lean, tmp_path


def step_inputs(rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 4, 8, 8, generator=g), torch.full((rows,), 500.0), torch.randn(rows, 77, 32, generator=g)


def weak_rows(model, weak, settings, step=0, total=10):
    """The weak rows' output of one routed UNet call (1 conditional, 1 weak row)."""
    unet = model.model.diffusion_model
    x, t, ctx = step_inputs(2)
    with torch.no_grad(), GuidanceRun(unet, weak, settings) as run:
        omega = run.begin_step(step, total, lambda: (ctx[:1], ctx[1:]))
        out = unet(x, t, context=ctx)
    return out[1:], omega


def relative(a, b):
    return float(torch.linalg.vector_norm((a - b).double()) / torch.linalg.vector_norm(b.double()))


# -- exact where the math says so ------------------------------------------------

def test_rank_r_difference_is_reproduced_to_fp_tolerance(low_rank_pair):
    base, tuned, lean, _ = low_rank_pair
    assert lean.energy_share == pytest.approx(1.0, abs=1e-6)
    live, ref = tuned.state_dict(), base.state_dict()
    for key, (up, down) in lean.factors.items():
        assert down.shape[0] <= RANK
        expected = (live[key].double() - ref[key].double()).reshape(up.shape[0], -1)
        assert relative(up.double() @ down.double(), expected) <= 1e-5, key
    for key, diff in lean.exact.items():  # small layers whose copy costs no more than their factors
        assert relative(diff.double(), live[key].double() - ref[key].double()) <= 1e-6, key
    assert lean.factors, "the rank-2 layers must be factored, not copied"


@pytest.mark.parametrize("omega", [0.0, 0.5])
def test_rank_r_weak_model_equals_the_interpolated_model(low_rank_pair, omega):
    base, tuned, lean, _ = low_rank_pair
    weak = lowrank.build_lean_weak_model(tuned, lean, ("constant", omega))
    out, _ = weak_rows(tuned, weak, PGSettings(True, omega))
    expected = interpolated_copy(base, tuned, omega) if omega else base
    x, t, ctx = step_inputs(2)
    with torch.no_grad():
        reference = expected.model.diffusion_model(x[1:], t[1:], context=ctx[1:])
    assert relative(out, reference) <= 1e-5
    assert weak.extra_bytes <= lean.budget_bytes


def test_scheduled_omega_needs_no_rebuild(low_rank_pair):
    base, tuned, lean, _ = low_rank_pair
    weak = lowrank.build_lean_weak_model(tuned, lean, ("scheduled",))
    settings = PGSettings(True, 0.2, schedule="linear", omega_end=0.6)
    out, omega = weak_rows(tuned, weak, settings, step=5)
    assert omega == pytest.approx(0.4)
    x, t, ctx = step_inputs(2)
    with torch.no_grad():
        reference = interpolated_copy(base, tuned, omega).model.diffusion_model(x[1:], t[1:], context=ctx[1:])
    assert relative(out, reference) <= 1e-5


def test_budget_at_least_the_exact_copy_copies_every_difference_exactly(tmp_path):
    base = make_sd1("tiny", seed=0)
    tuned = low_rank_tune(base, rank=8)
    active_path, base_path = write_pair(tmp_path, base, tuned)
    with open_checkpoint(active_path) as a, open_checkpoint(base_path) as b:
        exact_bytes = lowrank.estimated_differing_bytes(a, b, 4)
    lean = factor(active_path, base_path, exact_bytes)
    assert not lean.factors and lean.differing_bytes == exact_bytes == lean.spent_bytes
    live, ref = tuned.state_dict(), base.state_dict()
    assert all(torch.equal(d, live[k] - ref[k]) for k, d in lean.exact.items())


# -- large matrices: the randomized SVD and the two passes ---------------------------

LARGE = lowrank.FULL_SVD_MAX_SIDE + 88  # above the exact-SVD size: the randomized path
# How closely the randomized SVD rebuilds a matrix of rank below what it sketched,
# float32 throughout: an exact SVD of these reconstructs them within ~1e-6; the
# sketch measured up to 1.3e-5 on this workplace's AVX-512 Xeon (2026-12-07) and
# under 1e-5 on an earlier machine (the BLAS kernels' summation order differs).
SKETCH_RECONSTRUCTION = 5e-5


def with_spectrum(rows, cols, values, seed=0):
    """A rows × cols matrix with exactly these singular values (random singular vectors)."""
    g = torch.Generator().manual_seed(seed)
    k = len(values)
    u = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64)).Q
    return ((u * torch.tensor(values, dtype=torch.float64)) @ v.T).float()


@pytest.mark.parametrize("rank", [3, 40])  # within the first sketch; over several blocks
def test_randomized_svd_reproduces_a_large_rank_r_matrix(rank):
    matrix = with_spectrum(LARGE, 2 * LARGE, [1.0 / (i + 1) for i in range(rank)])
    u, s, vh = lowrank.truncated_svd(matrix, 64)
    assert len(s) >= rank
    assert relative((u * s) @ vh, matrix) <= SKETCH_RECONSTRUCTION


def test_randomized_svd_stops_at_the_floor_and_finds_every_value_above_it():
    true = [0.93 ** i for i in range(200)]
    matrix = with_spectrum(LARGE, 2 * LARGE, true)
    floor = true[40]
    u, s, vh = lowrank.truncated_svd(matrix, 200, floor=floor)
    assert len(s) < 100  # stopped near the floor, not at the rank asked for
    assert len(s) >= sum(1 for v in true if v >= floor)
    assert torch.allclose(s[:40].double(), torch.tensor(true[:40], dtype=torch.float64), rtol=0.02)
    assert relative(u.T @ u, torch.eye(len(s))) <= 1e-5


def large_pair(tmp_path, spectra, seed=0):
    """Checkpoints whose UNet has one large Linear weight per spectrum (its
    difference has exactly that spectrum), plus a bias each."""
    g = torch.Generator().manual_seed(seed)
    base, tuned = {}, {}
    for i, values in enumerate(spectra):
        key = f"model.diffusion_model.layer{i}"
        w = torch.randn(LARGE, 2 * LARGE, generator=g) * 0.02
        base[f"{key}.weight"], tuned[f"{key}.weight"] = w, w + with_spectrum(LARGE, 2 * LARGE, values, seed=seed + i)
        base[f"{key}.bias"] = torch.zeros(LARGE)
        tuned[f"{key}.bias"] = torch.randn(LARGE, generator=g) * 0.001
    save_checkpoint(base, tmp_path / "base.safetensors")
    save_checkpoint(tuned, tmp_path / "tuned.safetensors")
    return str(tmp_path / "tuned.safetensors"), str(tmp_path / "base.safetensors"), base, tuned


def test_two_passes_capture_what_full_spectra_would(tmp_path, monkeypatch):
    """The second pass computes each large layer only down to what the budget
    can still take: the allocation must capture what it would from every
    layer's exact, full spectrum (within the sketch's accuracy), with fewer
    sketch columns than factoring every layer to the rank cap."""
    spectra = [[scale * decay ** i for i in range(300)] for scale, decay in ((1.0, 0.97), (0.6, 0.99), (0.3, 0.9), (0.8, 0.95))]
    active_path, base_path, base, tuned = large_pair(tmp_path, spectra)
    budget = 140 * (3 * LARGE) * 4  # 140 ranks in all
    columns, grow = [], lowrank.RangeSketch.grow
    monkeypatch.setattr(lowrank.RangeSketch, "grow", lambda self, width: columns.append(width) or grow(self, width))
    lean = factor(active_path, base_path, budget)
    cap = min(lowrank.MAX_RANK, budget // (3 * LARGE * 4))
    # the first layer of the second pass goes to the cap (nothing bounds it yet), the others stop early
    assert sum(columns) < 0.75 * len(spectra) * (cap + lowrank.OVERSAMPLE)
    candidates = [candidate(f"model.diffusion_model.layer{i}.weight", values, (LARGE, 2 * LARGE))
                  for i, values in enumerate(spectra)]
    best = lowrank.allocate(candidates, budget, 4)
    factored = {k: sum(float(v) ** 2 for v in torch.linalg.svdvals((up @ down).double())) for k, (up, down) in lean.factors.items()}
    assert sum(factored.values()) >= 0.995 * best.captured_energy
    assert lean.spent_bytes <= budget
    for key, rank in best.ranks.items():
        assert abs(lean.ranks().get(key, 0) - rank) <= 3, key
    for key, (up, down) in lean.factors.items():  # the factors are the difference's own leading part
        diff = (tuned[key] - base[key]).double()
        approx = (up @ down).double()
        assert float(torch.linalg.vector_norm(diff - approx) ** 2) <= 1.02 * (float(diff.norm() ** 2) - factored[key])


def test_large_rank_r_pair_is_reproduced_and_progress_covers_both_passes(tmp_path):
    spectra = [[1.0 / (i + 1) for i in range(rank)] for rank in (2, 12, 30)]
    active_path, base_path, base, tuned = large_pair(tmp_path, spectra)
    reports = []
    with open_checkpoint(active_path) as a, open_checkpoint(base_path) as b:
        lean = lowrank.factor_pair(a, b, 50 * (3 * LARGE) * 4, torch.float32, progress=lambda d, t: reports.append((d, t)))
    assert lean.energy_share == pytest.approx(1.0, abs=1e-6)
    for key, (up, down) in lean.factors.items():
        assert relative(up.double() @ down.double(), (tuned[key] - base[key]).double()) <= SKETCH_RECONSTRUCTION, key
    done = [d for d, _ in reports]
    assert done == sorted(done) and reports[-1][0] == reports[-1][1]


def test_stopping_in_the_second_pass_raises(tmp_path):
    spectra = [[0.95 ** i for i in range(100)]] * 2
    active_path, base_path, _, _ = large_pair(tmp_path, spectra)
    reads = []
    with open_checkpoint(active_path) as a, open_checkpoint(base_path) as b:
        keys = lowrank.differing_keys(a, b)
        with pytest.raises(lowrank.FactoringInterrupted):
            lowrank.factor_pair(a, b, 10 * (3 * LARGE) * 4, torch.float32,
                                should_stop=lambda: reads.append(1) or len(reads) > len(keys))


# -- the budget ----------------------------------------------------------------------

def test_every_budget_is_respected_and_buys_more_energy(tmp_path):
    from tests.helpers import fine_tune

    base = make_sd1("tiny", seed=0)
    tuned = fine_tune(base, text_encoder=True)  # full-rank noise: every byte counts
    active_path, base_path = write_pair(tmp_path, base, tuned)
    shares = []
    for budget in (64 * 1024, 512 * 1024, 2 * 2**20):
        lean = factor(active_path, base_path, budget, dtype=torch.float16)
        assert lean.spent_bytes <= budget
        held = sum(t.numel() * t.element_size() for pair in lean.factors.values() for t in pair)
        held += sum(t.numel() * t.element_size() for t in lean.exact.values())
        assert held == lean.spent_bytes
        shares.append(lean.energy_share)
    assert shares == sorted(shares) and shares[0] < shares[-1] < 1


def candidate(key, singular_values, shape):
    return lowrank.Candidate(key, shape, sum(s * s for s in singular_values), tuple(singular_values))


def test_allocation_takes_singular_values_by_energy_per_byte():
    strong = candidate("a.weight", [10.0, 9.0, 1.0], (64, 64))
    weak = candidate("b.weight", [2.0, 1.5, 1.0], (64, 64))
    narrow = candidate("c.weight", [2.0, 1.5, 1.2], (16, 16))  # like `weak`, at a quarter of the bytes per rank
    norm = lowrank.Candidate("d.weight", (64,), 50.0)  # not factorable: all or nothing
    rank_bytes = 128 * 4
    allocation = lowrank.allocate([strong, weak, narrow, norm], 4 * rank_bytes, 4)
    # energy per byte: norm 50/256, strong 100/512 81/512 1/512, narrow 4/128 2.25/128 1.44/128, weak 4/512 ...:
    # 256 + 2·512 + 3·128 B spent, then nothing else fits in 2048 B
    assert allocation.exact == {"d.weight"}
    assert allocation.ranks == {"a.weight": 2, "c.weight": 3}
    assert allocation.spent_bytes == 256 + 2 * 512 + 3 * 128


def test_a_layer_whose_factors_cost_its_copy_is_copied():
    thin = candidate("out.weight", [3.0, 2.0, 1.0], (3, 4))  # rank 3 costs 3·7 > 12 elements
    allocation = lowrank.allocate([thin], 10**6, 4)
    assert allocation.exact == {"out.weight"} and not allocation.ranks
    assert allocation.spent_bytes == 12 * 4


# -- the file --------------------------------------------------------------------------

def test_file_round_trips_with_kohya_keys(low_rank_pair):
    _base, _tuned, lean, tmp_path = low_rank_pair
    path = str(tmp_path / "lean.safetensors")
    lowrank.write_lean_file(lean, path)
    from safetensors.torch import load_file

    keys = set(load_file(path))
    assert "lora_unet_input_blocks_1_1_proj_in.lora_down.weight" in keys
    assert "lora_unet_input_blocks_1_1_proj_in.alpha" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert all(k.startswith(("lora_unet_", "lora_te", lowrank.PG_EXACT)) for k in keys)
    conv = load_file(path)["lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight"]
    assert conv.dim() == 4 and conv.shape[2:] == (3, 3)  # LoCon: a 3×3 down conv, a 1×1 up conv
    back = lowrank.read_lean_file(path)
    assert back.factors.keys() == lean.factors.keys() and back.exact.keys() == lean.exact.keys()
    for key, (up, down) in lean.factors.items():
        assert torch.equal(back.factors[key][0], up) and torch.equal(back.factors[key][1], down)
    assert back.energy_share == pytest.approx(lean.energy_share)


def test_kohya_names_reach_every_layer_in_webui(low_rank_pair):
    """The names webui's Lora extension maps back to the layer (its compvis names)."""
    assert lowrank.lora_name("model.diffusion_model.middle_block.1.proj_out") == "lora_unet_middle_block_1_proj_out"
    assert (lowrank.lora_name("cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1")
            == "lora_te_text_model_encoder_layers_3_mlp_fc1")
    assert (lowrank.lora_name("conditioner.embedders.1.model.transformer.resblocks.2.mlp.c_fc")
            == "lora_te2_text_model_encoder_layers_2_mlp_fc1")
    assert lowrank.lora_name("first_stage_model.decoder.conv_in") is None


# -- the command line ---------------------------------------------------------------------

def run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    try:
        code = cli(list(argv), out=out, err=err)
    except SystemExit as exit_:
        code = exit_.code
    return code, out.getvalue(), err.getvalue()


def test_extract_writes_a_lora_file(low_rank_pair):
    _base, _tuned, _lean, tmp_path = low_rank_pair
    out_path = str(tmp_path / "cli.safetensors")
    budget_mib = rank_budget(_base, RANK) * 1.05 / 2**20
    code, out, err = run_cli("extract", str(tmp_path / "tuned.safetensors"), str(tmp_path / "base.safetensors"),
                             "--budget", f"{budget_mib:.4f}", "-o", out_path, "--dtype", "fp32")
    assert code == 0, err
    assert out.startswith(f"wrote {out_path}: ") and "captured 100.0 %" in out
    assert lowrank.read_lean_metadata(out_path)["dtype"] == "float32"


@pytest.mark.parametrize("argv, message", [
    (["--budget", "0"], "--budget must be a positive number of MiB"),
    (["--budget", "1", "-o", "/nonexistent-folder/x.safetensors"], "output folder not found"),
    (["--budget", "1", "-o", "x.ckpt"], "must end in .safetensors"),
])
def test_extract_refuses_bad_arguments_in_one_line(low_rank_pair, argv, message):
    _base, _tuned, _lean, tmp_path = low_rank_pair
    if "-o" not in argv:
        argv = argv + ["-o", str(tmp_path / "bad.safetensors")]
    code, out, err = run_cli("extract", str(tmp_path / "tuned.safetensors"), str(tmp_path / "base.safetensors"), *argv)
    assert code == 1 and not out
    assert err.count("\n") == 1 and message in err and err.startswith("python -m lib_pg extract: error: ")


def test_extract_refuses_missing_files_and_identical_models(low_rank_pair, capsys):
    _base, _tuned, _lean, tmp_path = low_rank_pair
    base = str(tmp_path / "base.safetensors")
    code, _out, err = run_cli("extract", str(tmp_path / "missing.safetensors"), base, "-o", str(tmp_path / "o.safetensors"))
    assert code == 1 and "file not found" in err
    code, _out, err = run_cli("extract", base, base, "--budget", "1", "-o", str(tmp_path / "o.safetensors"))
    assert code == 1 and "nothing to extract" in err
    code, _out, _err = run_cli("extract", base)
    err = capsys.readouterr().err  # argparse's own stream
    assert code == 2 and err.count("\n") == 1 and "required: BASE, -o/--out" in err


def test_extract_help_prints(capsys):
    code, _out, _err = run_cli("extract", "--help")
    assert code == 0 and "--budget MIB" in capsys.readouterr().out


# -- the file as an ordinary LoRA in webui ---------------------------------------------------

def unet_and_text_outputs(model):
    x, t, _ = step_inputs(2)
    with torch.no_grad():
        context = model.cond_stage_model(model.cond_stage_model.encode(["a photo of sks dog", ""]))
        return model.model.diffusion_model(x, t, context=context), context


@pytest.mark.parametrize("budget", ["rank", "exact"])
def test_file_loads_as_a_lora_on_the_base_through_webuis_lora_extension(tmp_path, budget):
    """webui's Lora extension (its fake, tests/fake_webui/lora) loads the file
    onto the base checkpoint: base + LoRA at weight 1 is the fine-tune, exactly
    where the budget holds the difference (rank ≤ r, or everything copied)."""
    lora_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_webui", "lora")
    if lora_dir not in sys.path:
        sys.path.insert(0, lora_dir)
    import networks  # noqa: PLC0415
    from modules import sd_models, shared  # noqa: PLC0415

    base = make_sd1("tiny", seed=0)
    tuned = low_rank_tune(base)
    with torch.no_grad():  # biases and norms too: they go in as LyCORIS "full" differences
        tuned.model.diffusion_model.out[0].weight.add_(0.1)
        tuned.model.diffusion_model.input_blocks[1][0].in_layers[2].bias.add_(0.1)
    active_path, base_path = write_pair(tmp_path, base, tuned)
    size = rank_budget(base, RANK) * 1.05 if budget == "rank" else 10**9
    lean = factor(active_path, base_path, int(size))
    lora_path = str(tmp_path / "subject.safetensors")
    lowrank.write_lean_file(lean, lora_path)

    expected_unet, expected_text = unet_and_text_outputs(tuned)
    plain_unet, _ = unet_and_text_outputs(base)
    shared.reset()
    networks.reset()
    networks.install_patches()
    try:
        sd_models.set_model(sd_models.FakeSdModel(base))
        networks.assign_network_names_to_compvis_modules(shared.sd_model)
        networks.register_network(lora_path, name="subject")
        networks.load_networks(["subject"], te_multipliers=[1.0], unet_multipliers=[1.0], dyn_dims=[None])
        assert not networks.extra_network_lora.errors
        net = networks.loaded_networks[0]
        assert any(type(m).__name__ == "NetworkModuleLora" for m in net.modules.values()) == (budget == "rank")
        got_unet, got_text = unet_and_text_outputs(base)
        networks.load_networks([], dyn_dims=[])
        unet_and_text_outputs(base)  # webui restores the weights at the next forward
    finally:
        networks.uninstall_patches()
        networks.reset()
        shared.reset()
    assert relative(got_text, expected_text) <= 1e-5
    assert relative(got_unet, expected_unet) <= 1e-5
    assert relative(plain_unet, expected_unet) > 1e-3


# -- text encoders: an embedding table costs its factors, not a copy -----------------------------

def trained_tokens(base, tokens=(7, 11, 42), scale=0.5, seed=5):
    """A fine-tune that trained a few tokens' embeddings (DreamBooth with the
    text encoder, a rare identifier token) and the UNet at low rank."""
    tuned = low_rank_tune(base)
    embedding = tuned.cond_stage_model.transformer.text_model.embeddings.token_embedding
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        embedding.weight[list(tokens)] += scale * torch.randn(len(tokens), embedding.weight.shape[1], generator=g)
    return tuned


def weak_text(model, weak, omega):
    """The text encoder's output on every row with the weak model's corrections (as PG computes
    the weak negative conditioning: lib_pg/hosts/common/conditioning.py)."""
    from lib_pg.routing import corrected_text_layers

    te = model.cond_stage_model
    with torch.no_grad(), corrected_text_layers(weak.text, omega):
        return te(te.encode(["a photo of sks dog", ""]))


def test_a_few_trained_tokens_are_factors_not_a_copy_of_the_table(tmp_path):
    base = make_sd1("tiny", seed=0)
    tuned = trained_tokens(base)
    active_path, base_path = write_pair(tmp_path, base, tuned)
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    table = tuned.state_dict()[key]
    table_bytes = table.numel() * table.element_size()
    lean = factor(active_path, base_path, int(1.05 * rank_budget(base, RANK)) + table_bytes // 4)
    assert key in lean.factors and key not in lean.exact
    up, down = lean.factors[key]
    assert down.shape[0] <= 3  # three trained rows: rank 3
    expected = tuned.state_dict()[key].double() - base.state_dict()[key].double()
    assert relative(up.double() @ down.double(), expected) <= 1e-5
    weak = lowrank.build_lean_weak_model(tuned, lean, ("constant", 0.0))
    held = sum(t.numel() * t.element_size() for t in lean.factors[key])
    assert held < table_bytes / 10
    for omega in (0.0, 0.5):
        reference = interpolated_copy(base, tuned, omega) if omega else base
        with torch.no_grad():
            te = reference.cond_stage_model
            expected_text = te(te.encode(["a photo of sks dog", ""]))
        assert relative(weak_text(tuned, weak, omega), expected_text) <= 1e-5
    assert relative(weak_text(tuned, weak, 1.0), weak_text(tuned, lowrank.build_lean_weak_model(tuned, lean, ("constant", 1.0)), 1.0)) == 0


def test_embedding_factors_round_trip_through_the_file_under_pgs_own_keys(tmp_path):
    base = make_sd1("tiny", seed=0)
    tuned = trained_tokens(base)
    active_path, base_path = write_pair(tmp_path, base, tuned)
    lean = factor(active_path, base_path, int(1.05 * rank_budget(base, RANK)) + 2**16)
    path = str(tmp_path / "lean.safetensors")
    lowrank.write_lean_file(lean, path)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
    assert any(k.startswith(lowrank.PG_LOWRANK) for k in keys)
    assert not any("embedding" in k for k in keys if k.startswith("lora_"))  # no LoRA loader reaches them
    read = lowrank.read_lean_file(path)
    assert set(read.factors) == set(lean.factors) and set(read.exact) == set(lean.exact)
    for key, (up, down) in lean.factors.items():
        assert torch.equal(read.factors[key][0] @ read.factors[key][1], up @ down), key
