"""End-to-end SDXL tests shared by the Forge-family hosts (test_reforge_sdxl_e2e.py, test_forge_sdxl_e2e.py).

The thin test modules set fork_e2e.FORK and import every test and fixture from here (one fork per
pytest run, as fork_e2e.py). Each run generates a random full-size SDXL 1.0 (rand-sdxl) and a
"fine-tune" of it (rand-sdxl-ft: a subset of UNet blocks and text-encoder layers perturbed) into
$PATH/models/Stable-diffusion (tests/e2e/make_sdxl_checkpoints.py, run with the fork's python, which
needs ldm under $PATH/repositories/stable-diffusion-stability-ai; skipped when its manifest matches;
6.9 GB each), a random kohya SDXL LoRA with UNet, te1 and te2 layers (make_sdxl_lora.py), and
starts the fork API-only on CPU with rand-sdxl-ft active. An SDXL fork process holds ~16 GiB:
run it alone (the repository's e2e runs take /work/hosts/heavy.lock).
"""

import os
import re
import subprocess
import threading
import time

import pytest

from . import fork_e2e as f
from . import webui_harness as h

BASE = "rand-sdxl"
ACTIVE = "rand-sdxl-ft"
GENERATOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "make_sdxl_checkpoints.py")
LORA = "pg-e2e-xl"
LORA_GENERATOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "make_sdxl_lora.py")
LORA_PROMPT = f.REQUEST["prompt"] + f" <lora:{LORA}:1>"
OWN_CALL = {"cfg_scale": 0, "negative_prompt": f.LONG_NEGATIVE}  # the unconditional chunk in a UNet call of its own
TO_BASE = {"override_settings": {"sd_model_checkpoint": BASE}, "override_settings_restore_afterwards": True}
TIMINGS = f.TIMINGS


def pg(**settings):
    return {"alwayson_scripts": {f.TITLE: {"args": [{"enabled": True, "base": BASE, **settings}]}}}


def strip(omega, loras=True, **more):
    return pg(omega=omega, base="", strip_loras=loras, **more)


def timed(label, result):
    return f.timed(label, result)


def peak_rss_gib(pid):
    """The process's peak resident memory (VmHWM), GiB."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def rss_gib(pid):
    """(resident, peak resident since the last reset) of the process, GiB."""
    found = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    found[line[:5]] = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return found.get("VmRSS", float("nan")), found.get("VmHWM", float("nan"))


MEMORY = []  # (label, resident GiB, peak GiB since the previous mark)


def reset_peak(server):
    """Restart the process's peak resident count (Linux: 5 > clear_refs), so the next mark is the peak of what ran between."""
    try:
        with open(f"/proc/{server.process.pid}/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def memory_mark(server, label):
    resident, peak = rss_gib(server.process.pid)
    MEMORY.append((label, resident, peak))
    reset_peak(server)


RATE = re.compile(r"(\d+)/(\d+) \[([\d:]+)<[\d:?]+,\s*[\d.]+(?:s/it|it/s)\]")


def last_step_rate(server):
    """Seconds per sampling step of the last finished sampler progress bar in the fork's log (its
    elapsed time over its steps, to the second: sampling only, without text encoding and VAE decode)."""
    with open(server.log_path, encoding="utf-8", errors="replace") as log:
        text = log.read()
    for segment in reversed(re.split(r"[\r\n]", text)):
        if "Total progress" in segment:
            continue
        match = RATE.search(segment)
        if match and match.group(1) == match.group(2):
            seconds = 0
            for part in match.group(3).split(":"):
                seconds = 60 * seconds + int(part)
            return seconds / int(match.group(1))
    return float("nan")


RATES = []  # (label, s/step)


def rated(server, label, result):
    RATES.append((label, last_step_rate(server)))
    return timed(label, result)


def log_lines(server, fragment):
    with open(server.log_path, encoding="utf-8", errors="replace") as log:
        return [line.strip() for line in log if fragment in line]


@pytest.fixture(scope="module")
def fork(request):
    started = time.perf_counter()
    failures_before = request.session.testsfailed
    models = os.path.join(f.FORK.path, "models", "Stable-diffusion")
    shared = os.environ.get("FORK_SDXL_MODELS")
    if shared:  # generated once for every host: linked, not generated again
        linked = f.link_shared_models(shared, models, (BASE, ACTIVE), ".rand-sdxl.json", GENERATOR)
        out = subprocess.CompletedProcess([], 0, stdout=f"linked from {shared} ({len(linked)} new links)")
    else:
        linked = []
        out = subprocess.run([f.FORK.generator_python, GENERATOR, models, "--repos", f.FORK.repositories], cwd=f.FORK.path,
                             env={**os.environ, **h.OFFLINE_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=3600)
    assert out.returncode == 0, out.stdout[-4000:]
    folder = os.path.join(f.FORK.path, "models", "Lora")
    os.makedirs(folder, exist_ok=True)
    lora_path = os.path.join(folder, LORA + ".safetensors")
    given = f.shared_lora("FORK_SDXL_LORA", LORA) or f.shared_lora("FORK_SDXL_MODELS", LORA)
    if given:  # make_sdxl_lora.py's output for rand-sdxl-ft, generated once for every host
        assert not os.path.lexists(lora_path), f"{lora_path} exists"
        os.symlink(given, lora_path)
        made = subprocess.CompletedProcess([], 0, stdout=f"LoRA linked from {given}")
    else:
        made = subprocess.run([f.FORK.python, LORA_GENERATOR, os.path.join(models, ACTIVE + ".safetensors"), lora_path, "--seed", "3"],
                              cwd=f.FORK.path, env={**os.environ, **h.OFFLINE_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=900)
    assert made.returncode == 0, made.stdout[-4000:]
    link = os.path.join(f.FORK.path, "extensions", h.EXTENSION_NAME)
    made_link = False
    if os.path.lexists(link):
        assert os.path.realpath(link) == os.path.realpath(h.REPO_ROOT), f"{link} is not this repository"
    else:
        os.symlink(h.REPO_ROOT, link, target_is_directory=True)
        made_link = True
    server = f.ForkServer(ACTIVE)
    try:
        server.start(timeout=1200)
        memory_mark(server, "API up")
        print(f"\n[pg-e2e-{f.FORK.name}-sdxl] checkpoints {out.stdout.strip().splitlines()[-1]}; {made.stdout.strip()}; "
              f"API after {server.start_seconds:.1f} s")
        yield server
    finally:
        peak = peak_rss_gib(server.process.pid) if server.process is not None else float("nan")
        server.stop()
        if made_link:
            os.unlink(link)
        os.remove(lora_path)  # the link only, where the LoRA was given
        for path in linked:
            os.unlink(path)
        if request.session.testsfailed == failures_before and os.path.exists(server.log_path):
            os.remove(server.log_path)  # kept (and its tail shown in the report) when a test failed
        print(f"\n[pg-e2e-{f.FORK.name}-sdxl] peak RSS {peak:.1f} GiB; fixture total {time.perf_counter() - started:.1f} s; "
              + ", ".join(f"{label} {seconds:.1f} s" for label, seconds in TIMINGS)
              + f"; load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}"
              + "\n  memory (resident / peak since the previous mark, GiB): "
              + ", ".join(f"{label} {resident:.1f} / {top:.1f}" for label, resident, top in MEMORY)
              + "\n  sampling s/step (tqdm): " + ", ".join(f"{label} {rate:.2f}" for label, rate in RATES))


@pytest.fixture(scope="module")
def disabled(fork):
    result = rated(fork, "disabled", f.generate(fork))
    memory_mark(fork, "plain (SDXL loaded, first image)")
    return result


def test_the_fork_loads_the_sdxl_checkpoint_and_pg(fork, disabled):
    status, scripts = h.request(fork.url, "GET", "/sdapi/v1/scripts")
    assert status == 200 and f.TITLE.lower() in scripts["txt2img"]
    assert f"Model: {ACTIVE}," in disabled.infotext


def test_omega_one_is_pg_disabled_bit_for_bit(fork, disabled):
    same = timed("ω=1", f.generate(fork, pg(omega=1.0)))
    assert same.pixels == disabled.pixels


@pytest.fixture(scope="module")
def pg03(fork, disabled):
    reset_peak(fork)
    result = timed("ω=0.3 (first: weak weights built)", f.generate(fork, pg(omega=0.3)))
    memory_mark(fork, "PG exact (weak weights built, first image)")
    return result


def test_omega_03_changes_the_image_and_is_reproducible(fork, disabled, pg03):
    assert f.max_difference(pg03.pixels, disabled.pixels) > 10
    assert f"PG base: {BASE}" in pg03.infotext and "PG skipped" not in pg03.infotext
    plain = rated(fork, "disabled (again)", f.generate(fork))
    again = rated(fork, "ω=0.3 (cached)", f.generate(fork, pg(omega=0.3)))
    assert again.pixels == pg03.pixels and plain.pixels == disabled.pixels
    built = log_lines(fork, "built weak model from")
    assert built and "text-encoder layers" in built[-1]
    print(f"\n[pg-e2e-{f.FORK.name}-sdxl] exact weak weights: {built[-1]}")


@pytest.fixture(scope="module")
def base_images(fork):
    """The base checkpoint's own images at CFG Scale 0 (its unconditional branch alone)."""
    reset_peak(fork)
    own = timed("base checkpoint cfg 0 (switch)", f.generate(fork, {**OWN_CALL, **TO_BASE}))
    batched = f.generate(fork, {"cfg_scale": 0, **TO_BASE})
    assert f"Model: {BASE}," in own.infotext
    memory_mark(fork, "plain, switched to the base checkpoint and back (twice)")
    return own, batched


def test_omega_zero_is_the_base_model_at_cfg_zero(fork, base_images):
    """ω = 0 at CFG Scale 0: the base checkpoint's UNet, both text encoders (cross-attention and the
    pooled `y` vector) as the fork converts them."""
    base_own, base_batched = base_images
    guided_own = timed("ω=0 cfg 0 (uncond alone)", f.generate(fork, {**OWN_CALL, **pg(omega=0.0)}))
    guided_batched = f.generate(fork, {"cfg_scale": 0, **pg(omega=0.0)})
    active_own = f.generate(fork, OWN_CALL)
    alone, batched = f.max_difference(guided_own.pixels, base_own.pixels), f.max_difference(guided_batched.pixels, base_batched.pixels)
    print(f"\n[pg-e2e-{f.FORK.name}-sdxl] ω=0 vs base at cfg 0: uncond alone {alone}, batched {batched} "
          f"(active vs base: {f.max_difference(active_own.pixels, base_own.pixels)})")
    assert f.max_difference(active_own.pixels, base_own.pixels) > 10
    assert alone <= 1
    assert batched <= 1


def test_lean_is_within_budget_and_closer_to_exact_than_cfg(fork, base_images):
    base_own, _ = base_images
    exact = f.generate(fork, {**OWN_CALL, **pg(omega=0.0, weights="exact")})
    memory_mark(fork, "PG exact (built again), before lean")
    lean = timed("lean ω=0 cfg 0 (factored)", f.generate(fork, {**OWN_CALL, **pg(omega=0.0, weights="lean")}))
    memory_mark(fork, "PG lean (factoring, first image)")
    plain = f.generate(fork, OWN_CALL)
    assert 'PG weights: "low-rank' in lean.infotext, lean.infotext
    lines = log_lines(fork, "lean weak weights from")
    assert lines, "no lean build logged"
    spent, budget = (float(x) for x in re.search(r"([\d.]+) MiB of a ([\d.]+) MiB budget", lines[-1]).groups())
    to_exact, cfg_to_exact = f.max_difference(lean.pixels, exact.pixels), f.max_difference(plain.pixels, exact.pixels)
    mean = lambda a, b: sum(abs(x - y) for x, y in zip(a, b)) / len(a)  # noqa: E731
    print(f"\n[pg-e2e-{f.FORK.name}-sdxl] lean: {lines[-1]}\n  lean vs exact at ω=0 cfg 0: max {to_exact}, mean "
          f"{mean(lean.pixels, exact.pixels):.2f}; plain CFG vs exact: max {cfg_to_exact}, mean {mean(plain.pixels, exact.pixels):.2f}")
    assert spent <= budget
    assert mean(lean.pixels, exact.pixels) < mean(plain.pixels, exact.pixels)
    again = rated(fork, "lean ω=0 cfg 0 (cached)", f.generate(fork, {**OWN_CALL, **pg(omega=0.0, weights="lean")}))
    assert again.pixels == lean.pixels
    memory_mark(fork, "PG lean (cached, an image)")


@pytest.fixture(scope="module")
def lora_off(fork):
    status, _ = h.request(fork.url, "POST", "/sdapi/v1/refresh-loras", {})
    assert status == 200
    status, loras = h.request(fork.url, "GET", "/sdapi/v1/loras")
    assert status == 200 and LORA in {entry["name"] for entry in loras}, loras
    return timed("LoRA, disabled", f.generate(fork, {"prompt": LORA_PROMPT}))


def test_the_lora_changes_the_image(fork, disabled, lora_off):
    assert f.max_difference(lora_off.pixels, disabled.pixels) > 10


def test_lora_strip_weak_branch_is_the_model_without_the_lora(fork, lora_off):
    """An SDXL LoRA with UNet, te1 and te2 layers, stripped: ω = 0 at CFG Scale 0 is the fork's image
    of the prompt without it (low-rank corrections on the UNet and both text encoders)."""
    same = timed("LoRA strip ω=1", f.generate(fork, {"prompt": LORA_PROMPT, **strip(1.0)}))
    assert same.pixels == lora_off.pixels
    guided = timed("LoRA strip ω=0 cfg 0", f.generate(fork, {**OWN_CALL, "prompt": LORA_PROMPT, **strip(0.0)}))
    without = f.generate(fork, OWN_CALL)
    with_lora = f.generate(fork, {**OWN_CALL, "prompt": LORA_PROMPT})
    built = log_lines(fork, "built weak model from the active model")
    print(f"\n[pg-e2e-{f.FORK.name}-sdxl] LoRA stripped, ω=0 vs without it at cfg 0: "
          f"{f.max_difference(guided.pixels, without.pixels)} (with vs without: {f.max_difference(with_lora.pixels, without.pixels)}); "
          f"{built[-1] if built else 'no build logged'}")
    assert f.max_difference(with_lora.pixels, without.pixels) > 10
    assert f.max_difference(guided.pixels, without.pixels) <= 1
    assert built and "text-encoder layers" in built[-1]


def test_refusals_stop_before_sampling(fork):
    f.expect_error(fork, {"prompt": LORA_PROMPT, **pg(omega=0.3, weights="lean", strip_loras=True)}, "lean")
    f.expect_error(fork, pg(omega=0.3, base="no-such-model"), "unknown base checkpoint")


def test_the_model_is_unchanged_after_success_error_and_interrupt(fork, disabled, lora_off):
    done = {}

    def run():
        done["result"] = f.call(fork, {"prompt": LORA_PROMPT, **strip(0.3), "steps": 12})

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(15)
    h.request(fork.url, "POST", "/sdapi/v1/interrupt", {})
    thread.join(1800)
    assert done["result"][0] == 200
    assert f.generate(fork, {"prompt": LORA_PROMPT}).pixels == lora_off.pixels
    assert timed("disabled after everything", f.generate(fork)).pixels == disabled.pixels
