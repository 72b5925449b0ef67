"""`python -m lib_pg inspect|bake`: streaming checkpoint access, the per-block report,
the PNG plot, baking θ_base + ω·(θ_active − θ_base), and one-line error exits."""

import io
import os
import struct
import subprocess
import sys
import weakref
import zlib

import pytest
import torch
from safetensors.torch import load_file

from lib_pg import inspector
from lib_pg.checkpoints import Checkpoint, clean_keys, looks_like_lora, open_checkpoint
from lib_pg.errors import PGError
from lib_pg.inspector import SafetensorsWriter, main
from lib_pg.weights import same_bits
from tests.helpers import fine_tune
from tests.ldm_models import make_sd1, make_sdxl_like_state_dict, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEAK = ("model.diffusion_model.", "cond_stage_model.")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inspector")
    base = make_sd1("tiny", seed=0)
    base_sd = dict(base.state_dict())
    tuned_sd = dict(fine_tune(base, scale=0.02).state_dict())
    tuned_te_sd = dict(fine_tune(base, scale=0.02, text_encoder=True).state_dict())
    # an active file whose VAE and schedule buffers also differ: bake must copy them from the active file
    g = torch.Generator().manual_seed(5)
    vae_sd = {k: (v + torch.randn(v.shape, generator=g) * 0.1 if k.startswith(("first_stage_model.", "alphas"))
                  and v.is_floating_point() else v) for k, v in tuned_te_sd.items()}
    paths = {name: str(d / f"{name}.safetensors") for name in ("base", "tuned", "tuned_te", "vae", "xl", "lora")}
    save_checkpoint(base_sd, paths["base"])
    save_checkpoint(tuned_sd, paths["tuned"])
    save_checkpoint(tuned_te_sd, paths["tuned_te"])
    save_checkpoint(vae_sd, paths["vae"])
    save_checkpoint(make_sdxl_like_state_dict("tiny"), paths["xl"])
    save_checkpoint({
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 32),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 32),
    }, paths["lora"])
    return d, paths, {"base": base_sd, "tuned": tuned_sd, "tuned_te": tuned_te_sd, "vae": vae_sd}


def run_main(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def component_line(text, label):
    return next(line for line in text.splitlines() if line.strip().startswith(label))


# -- streaming access ------------------------------------------------------------------------

def test_checkpoint_lists_keys_without_reading_and_reads_one_tensor(files, monkeypatch):
    _, paths, sds = files
    reads = []
    real_get = Checkpoint.get
    monkeypatch.setattr(Checkpoint, "get", lambda self, key: reads.append(key) or real_get(self, key))
    with open_checkpoint(paths["base"]) as ckpt:
        assert set(ckpt.keys) == set(sds["base"])
        assert ckpt.shapes["model.diffusion_model.out.2.weight"] == tuple(sds["base"]["model.diffusion_model.out.2.weight"].shape)
        assert ckpt.dtypes["model.diffusion_model.out.2.weight"] == torch.float32
        assert reads == []
        key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
        assert same_bits(ckpt.get(key), sds["base"][key])
        assert reads == [key]


def test_old_style_ckpt_keys_are_cleaned_like_webui(files, tmp_path):
    _, paths, sds = files
    old = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
           for k, v in sds["base"].items()}
    assert any(k.startswith("cond_stage_model.transformer.encoder.") for k in old)
    path = str(tmp_path / "old.ckpt")
    torch.save({"state_dict": old, "global_step": 1}, path)
    with open_checkpoint(path) as ckpt:
        assert set(ckpt.keys) == set(sds["base"])
        key = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
        assert same_bits(ckpt.get(key), sds["base"][key])
    # the .ckpt and the safetensors file are the same model: inspect says so
    code, out, _ = run_main("inspect", path, paths["base"])
    assert code == 0
    assert "same" in component_line(out, "UNet") and "same" in component_line(out, "text encoder")


def test_sd2_turbo_keys_move_to_the_ldm_layout():
    shapes = {"conditioner.embedders.0.model.ln_final.weight": (1024,), "model.diffusion_model.out.2.weight": (4, 320, 3, 3)}
    assert set(clean_keys(shapes)) == {"cond_stage_model.model.ln_final.weight", "model.diffusion_model.out.2.weight"}


def test_looks_like_lora():
    assert looks_like_lora(["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"])
    assert looks_like_lora(["lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha"])
    assert looks_like_lora(["lycoris_x.hada_w1_a", "lycoris_x.alpha"])
    assert looks_like_lora(["lora_unet_x.lokr_w1"])
    assert not looks_like_lora(["model.diffusion_model.out.2.weight", "lora_unet_x.lora_down.weight"])
    assert not looks_like_lora(["first_stage_model.encoder.conv_in.weight"])


# -- inspect ---------------------------------------------------------------------------------

def test_inspect_fine_tune_against_its_base(files):
    _, paths, sds = files
    code, out, err = run_main("inspect", paths["tuned"], paths["base"])
    assert code == 0, err
    assert out.count("family: SD 1.x") == 2
    assert "looks like a LoRA: no" in out
    assert "compatible: yes" in out
    assert "differs" in component_line(out, "UNet (model.diffusion_model)")
    assert "same" in component_line(out, "text encoder (cond_stage_model)")
    assert "same" in component_line(out, "VAE (first_stage_model)")

    report = inspector.inspect(paths["tuned"], paths["base"], out=io.StringIO())
    unet = report.components["UNet"]
    assert unet.differing == unet.tensors > 0
    assert report.components["text encoder"].differing == 0
    assert report.components["VAE"].differing == 0
    names = [name for name, _ in report.ordered_blocks()]
    assert names == (["time_embed"] + [f"input_blocks.{i}" for i in range(9)] + ["middle_block"]
                     + [f"output_blocks.{i}" for i in range(9)] + ["out"])
    for name in names:
        assert name in out
    # the table's numbers are ‖Δ‖/‖base‖ over the block's tensors
    keys = [k for k in sds["base"] if k.startswith("model.diffusion_model.out.")]
    delta = sum(float((sds["tuned"][k] - sds["base"][k]).double().norm()) ** 2 for k in keys)
    norm = sum(float(sds["base"][k].double().norm()) ** 2 for k in keys)
    assert report.blocks["out"].relative == pytest.approx((delta / norm) ** 0.5, rel=1e-4)
    assert 0.05 < report.blocks["out"].relative < 0.5


def test_inspect_sees_a_tuned_text_encoder(files):
    _, paths, _ = files
    code, out, _ = run_main("inspect", paths["tuned_te"], paths["base"])
    assert code == 0
    assert "differs" in component_line(out, "text encoder (cond_stage_model)")
    assert "same" in component_line(out, "VAE (first_stage_model)")
    assert "PG's weak model interpolates: UNet, text encoder" in out


def test_plot_writes_a_valid_png(files, tmp_path):
    _, paths, _ = files
    png = tmp_path / "blocks.png"
    code, out, _ = run_main("inspect", paths["tuned"], paths["base"], "--plot", str(png))
    assert code == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert (length, kind) == (13, b"IHDR")
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    assert struct.unpack(">I", data[29:33])[0] == zlib.crc32(data[12:29])
    n_blocks = 21
    assert (width, height, depth, colour) == (2 * 12 + n_blocks * 14 + (n_blocks - 1) * 4, 220, 8, 2)
    assert f"({width}×{height})" in out
    # the pixel data decompresses to one filter byte + RGB per row
    pos, idat = 8, b""
    while pos < len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + size]
        pos += 12 + size
    assert kind == b"IEND"
    assert len(zlib.decompress(idat)) == height * (1 + 3 * width)


# -- bake --------------------------------------------------------------------------------------

@pytest.mark.parametrize("omega", [0.0, 0.5, 1.0])
def test_bake_interpolates_unet_and_text_encoder_and_copies_the_rest(files, tmp_path, omega):
    _, paths, sds = files
    out_path = str(tmp_path / f"weak_{omega}.safetensors")
    code, out, err = run_main("bake", paths["vae"], paths["base"], "--omega", str(omega), out_path)
    assert code == 0, err
    baked = load_file(out_path)
    active, base = sds["vae"], sds["base"]
    assert set(baked) == set(active)
    for key, tensor in baked.items():
        if key.startswith(WEAK) and tensor.is_floating_point():
            if omega == 0.0:
                assert same_bits(tensor, base[key]), key
            elif omega == 1.0:
                assert same_bits(tensor, active[key]), key
            else:
                assert same_bits(tensor, torch.lerp(base[key], active[key], omega)), key
        else:  # VAE, schedule buffers, position ids: the active file's, unchanged
            assert same_bits(tensor, active[key]), key
    assert any(not same_bits(active[k], base[k]) for k in active if k.startswith("first_stage_model."))


def test_bake_fp16_keeps_the_dtype(tmp_path):
    base = make_sd1("tiny", seed=0, dtype=torch.float16)
    tuned = fine_tune(base)
    save_checkpoint(base.state_dict(), tmp_path / "b.safetensors")
    save_checkpoint(tuned.state_dict(), tmp_path / "a.safetensors")
    code, _, err = run_main("bake", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                            "--omega", "0.25", str(tmp_path / "o.safetensors"))
    assert code == 0, err
    baked = load_file(tmp_path / "o.safetensors")
    key = "model.diffusion_model.middle_block.0.in_layers.2.weight"
    assert baked[key].dtype == torch.float16
    expected = torch.lerp(base.state_dict()[key], tuned.state_dict()[key], 0.25)
    assert same_bits(baked[key], expected)


def test_bake_streams_one_tensor_pair_at_a_time(files, tmp_path, monkeypatch):
    _, paths, _ = files
    events, alive, peak = [], [0], [0]
    real_get, real_write = Checkpoint.get, SafetensorsWriter.write

    def counting_get(self, key):
        tensor = real_get(self, key)
        events.append(("get", key))
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(tensor, lambda: alive.__setitem__(0, alive[0] - 1))
        return tensor

    def logging_write(self, key, tensor):
        events.append(("write", key))
        return real_write(self, key, tensor)

    monkeypatch.setattr(Checkpoint, "get", counting_get)
    monkeypatch.setattr(SafetensorsWriter, "write", logging_write)
    code, _, err = run_main("bake", paths["tuned_te"], paths["base"], "--omega", "0.5", str(tmp_path / "o.safetensors"))
    assert code == 0, err
    assert peak[0] <= 2  # never more than one tensor pair read and alive
    writes = [i for i, (kind, _) in enumerate(events) if kind == "write"]
    assert len(writes) == len(load_file(tmp_path / "o.safetensors"))
    previous = -1
    for i in writes:  # each written tensor was read just before it, from at most two reads
        reads = events[previous + 1:i]
        assert 1 <= len(reads) <= 2 and all(kind == "get" and key == events[i][1] for kind, key in reads)
        previous = i


def test_safetensors_writer_round_trip(tmp_path):
    tensors = {"a.bf16": torch.randn(3, 5).bfloat16(), "b.int": torch.arange(7), "c.scalar": torch.tensor(2.5),
               "d.empty": torch.zeros(0, 4), "e.half": torch.randn(2, 2, 3).half(), "f.bool": torch.tensor([True, False])}
    path = str(tmp_path / "w.safetensors")
    with SafetensorsWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], {"note": "x"}) as w:
        for k, v in tensors.items():
            w.write(k, v)
    loaded = load_file(path)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and same_bits(loaded[k], v)
    header_length = struct.unpack("<Q", open(path, "rb").read(8))[0]
    assert header_length % 8 == 0
    with pytest.raises(ValueError):
        with SafetensorsWriter(str(tmp_path / "bad.safetensors"), [("x", torch.float32, (2,))]) as w:
            w.write("x", torch.zeros(3))
    assert not os.path.exists(tmp_path / "bad.safetensors") and not os.path.exists(tmp_path / "bad.safetensors.part")


# -- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing", "lora", "families", "families_reversed", "omega", "lora_base"])
def test_bad_inputs_exit_non_zero_with_one_line(files, tmp_path, case):
    _, paths, _ = files
    out_path = str(tmp_path / "o.safetensors")
    args = {
        "missing": ["bake", str(tmp_path / "nope.safetensors"), paths["base"], "--omega", "0.5", out_path],
        "lora": ["bake", paths["lora"], paths["base"], "--omega", "0.5", out_path],
        "lora_base": ["inspect", paths["tuned"], paths["lora"]],
        "families": ["inspect", paths["tuned"], paths["xl"]],
        "families_reversed": ["bake", paths["xl"], paths["base"], "--omega", "0.5", out_path],
        "omega": ["bake", paths["tuned"], paths["base"], "--omega", "1.5", out_path],
    }[case]
    code, out, err = run_main(*args)
    assert code != 0
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert not os.path.exists(out_path)
    expected = {"missing": ["not found", "nope.safetensors"], "lora": ["looks like a LoRA"],
                "lora_base": ["looks like a LoRA", "base"],
                "families": ["SD 1.x", "SDXL", "first mismatching key"],
                "families_reversed": ["SD 1.x", "SDXL", "first mismatching key"],
                "omega": ["omega", "1.5"]}[case]
    for word in expected:
        assert word in err


def test_command_line_entry_point(files, tmp_path):
    _, paths, _ = files
    env = dict(os.environ, PYTHONPATH=ROOT)
    ok = subprocess.run([sys.executable, "-m", "lib_pg", "inspect", paths["tuned"], paths["base"]],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "compatible: yes" in ok.stdout, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "lib_pg", "bake", paths["lora"], paths["base"], "--omega", "0.5",
                          str(tmp_path / "o.safetensors")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0
    assert bad.stderr.count("\n") == 1 and "LoRA" in bad.stderr


def test_progress_every_five_percent():
    stream = io.StringIO()
    progress = inspector.Progress("bake", 1000, stream, min_total=0)
    for _ in range(100):
        progress.advance(10)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "bake:   5%" or lines[0] == "bake:   0%"
    assert lines[-1] == "bake: 100%" and len(lines) <= 21
    quiet = io.StringIO()
    inspector.Progress("bake", 1000, quiet).advance(1000)  # small files: no progress
    assert quiet.getvalue() == ""


def test_pgerror_for_a_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(PGError):
        open_checkpoint(str(path))
