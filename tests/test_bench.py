"""The benchmark keeps working: a tiny configuration, exact facts only (no timings)."""

from bench import run as bench

KEYS = {"ratio_checkpoint", "ratio_lora", "evals_equal", "build_s", "read_s", "cache_hit_ms", "extra_mem_ratio", "stream_s",
        "lora_extra_mem_ratio", "lean_extra_mem_ratio", "ratio_lean", "lean_error", "factor_s", "lean_load_ms"}


def test_tiny_benchmark_reports_every_key_and_equal_evaluations(capsys):
    result = bench.main(["--tiny", "--rounds", "1", "--batch-sizes", "1"])
    assert KEYS <= set(result)
    assert result["evals_equal"] is True
    assert result["extra_mem_ratio"] == 1.0  # constant ω: exactly one copy of the differing weights
    assert result["lora_extra_mem_ratio"] <= 2.0  # low-rank corrections, or copies no bigger than twice the LoRA
    # lean weights on the tiny DreamBooth: within the default budget (8 % of the exact copy), closer to
    # exact mode than plain CFG's unconditional branch, and more budget buys less error
    assert result["lean_extra_mem_ratio"] <= 0.08 + 1e-6
    assert 0 < result["lean_error"] < 1
    errors = [row["lean_error"] for row in result["lean_table"]]
    assert errors == sorted(errors, reverse=True)
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith("{") and '"evals_equal": true' in last_line


def test_kernel_floor_script_times_every_shape(capsys):
    from bench import kernels

    kernels.main(["--latent", "8", "--repeats", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| conv") or line.startswith("| linear")]
    assert len(rows) == len(kernels.SHAPES)
