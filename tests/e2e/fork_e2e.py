"""End-to-end tests shared by the Forge-family hosts (test_reforge_e2e.py, test_forge_e2e.py, test_neo_e2e.py).

The thin test modules set FORK (the host's name, its install path and python from the
environment) and import every test and fixture from here. Each run generates a random full-size
SD 1.5 (rand-sd15) and a "fine-tune" of it (rand-sd15-ft) into $PATH/models/Stable-diffusion
(tests/e2e/make_sd15_checkpoints.py, run with the fork's python; skipped when its manifest matches;
about 2 GB each: the forks detect the family from tensor shapes and do not load tiny models),
symlinks this repository into $PATH/extensions and starts the fork API-only on CPU (--always-cpu)
with rand-sd15-ft active. Expect 5-15 s per 64x64, 4-step image and 40-50 s per checkpoint switch
on a small CPU machine, 6-7 GB of RAM plus the weak weights (3.3 GB in fp32).
"""

import hashlib
import json
import os
import shlex
import subprocess
import threading
import time

import pytest

from . import webui_harness as h



class Fork:
    """The host under test: name (as PG's messages say it), install path, python."""

    def __init__(self, name, path_var, python_var, packages):
        self.name, self.path_var, self.python_var = name, path_var, python_var
        self.path = os.environ.get(path_var)
        self.python = os.environ.get(python_var) or (os.path.join(self.path, "venv", "bin", "python") if self.path else None)
        self.packages = packages
        # make_sd15_checkpoints.py needs ldm (and what it imports): the fork's repositories/ by
        # default; FORK_GENERATOR_PYTHON / FORK_REPOS name another install's for a fork without ldm.
        self.generator_python = os.environ.get("FORK_GENERATOR_PYTHON") or self.python
        self.repositories = os.environ.get("FORK_REPOS") or (os.path.join(self.path, "repositories") if self.path else None)

    def launch_args(self, checkpoint_path, port):
        """The launch.py arguments that start the fork API-only on the CPU with this checkpoint active."""
        return [*FLAGS, "--server-name", "127.0.0.1", "--port", str(port), "--ckpt", checkpoint_path]

    def skip_reason(self):
        if not self.path:
            return f"{self.name} end-to-end tests need a {self.name} install: set {self.path_var} (and {self.python_var})"
        missing = [p for p in self.packages if not os.path.isdir(os.path.join(self.path, p))]
        if missing:
            return f"{self.path_var}={self.path} is not a {self.name} install (no {', '.join(missing)})"
        return None


FORK = None  # set by the importing test module before the tests run

TITLE = "Personalization Guidance"
BASE = "rand-sd15"
ACTIVE = "rand-sd15-ft"
GENERATOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "make_sd15_checkpoints.py")
FLAGS = ["--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--skip-version-check",
         "--skip-python-version-check", "--no-download-sd-model", "--api", "--nowebui", "--always-cpu"]
# A negative prompt of 5 chunks of 75 tokens: its cross-attention length is more than 4 times the
# prompt's, so the forks' calc_cond_(uncond_)batch cannot batch it with the prompt (can_concat_cond) and
# run the unconditional chunk in a UNet call of its own.
LONG_NEGATIVE = " ".join(["blurry"] * 330)

REQUEST = {
    "prompt": "a photo of sks dog on the beach",
    "negative_prompt": "blurry",
    "steps": 4,
    "width": 64,
    "height": 64,
    "sampler_name": "Euler",
    "scheduler": "Automatic",
    "seed": 1234,
    "cfg_scale": 5,
    "batch_size": 1,
    "send_images": True,
    "save_images": False,
    "override_settings": {"live_previews_enable": False},  # its TAESD preview would be downloaded
}


def link_shared_models(shared, models_dir, names, manifest, generator):
    """Link the random checkpoints another run generated (FORK_SD15_MODELS / FORK_SDXL_MODELS: a folder
    holding `names` and the generator's manifest) into the fork's models folder instead of generating
    them again; refused unless that manifest is the generator's current one (its sha256). Returns
    the links made (removed after the module); files already there are left alone."""
    with open(generator, "rb") as script, open(os.path.join(shared, manifest)) as written:
        current, recorded = hashlib.sha256(script.read()).hexdigest(), json.load(written).get("script")
    assert recorded == current, (f"{shared}/{manifest} was written by another version of {os.path.basename(generator)}: "
                                 "regenerate the shared models (or unset the variable to generate them here)")
    os.makedirs(models_dir, exist_ok=True)
    made = []
    for name in (*(n + ".safetensors" for n in names), manifest):
        source, link = os.path.join(shared, name), os.path.join(models_dir, name)
        assert os.path.isfile(source), f"{source} is missing"
        if os.path.lexists(link):
            assert not os.path.islink(link) or os.path.realpath(link) == os.path.realpath(source), f"{link} links elsewhere"
            continue
        os.symlink(source, link)
        made.append(link)
    return made


def shared_lora(variable, name):
    """A LoRA file another run generated: $<variable> names the file, or the folder of the shared
    models holds `<name>.safetensors`; None: generate it here."""
    path = os.environ.get(variable)
    if path and os.path.isdir(path):
        path = os.path.join(path, name + ".safetensors")
    return path if path and os.path.isfile(path) else None


def pg(**settings):
    return {"alwayson_scripts": {TITLE: {"args": [{"enabled": True, "base": BASE, **settings}]}}}


class Result:
    def __init__(self, body, seconds):
        self.body = body
        self.seconds = seconds
        self.info = json.loads(body["info"])
        self.infotext = self.info["infotexts"][0]
        self.size, self.pixels = h.image_pixels(body["images"][0])


def max_difference(a, b):
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


class ForkServer:
    def __init__(self, checkpoint):
        self.port = h.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(FORK.path, f"pg-e2e-{FORK.name.lower()}-{self.port}.log")
        ckpt = os.path.join(FORK.path, "models", "Stable-diffusion", checkpoint + ".safetensors")
        self.command = [FORK.python, "launch.py", *FORK.launch_args(ckpt, self.port), *shlex.split(os.environ.get("FORK_EXTRA_ARGS", ""))]
        self.process = None

    # reForge @ 3b56b268 loads the --ckpt model (modules/initialize.py main_thread.async_run) while the
    # API thread builds its routes; the load's memory cleanup walks gc.get_objects()
    # (modules/sd_models.py force_memory_deallocation), which can hold a reference to a tuple pydantic
    # is still resizing: the API thread dies with "SystemError: Objects/tupleobject.c:927" and the API
    # never answers, while the process lives on. A fresh start is another draw of that race.
    API_THREAD_DIED = ("Exception in thread", "api_only_worker")
    START_TRIES = 3

    def start(self, timeout=600):
        for attempt in range(1, self.START_TRIES + 1):
            if self._start(timeout):
                return
            self.stop()
            print(f"\n[pg-e2e-{FORK.name}] the API thread died at start-up (try {attempt}); restarting")
            os.replace(self.log_path, f"{self.log_path}.died-{attempt}")
        raise RuntimeError(f"{FORK.name}'s API thread died at start-up {self.START_TRIES} times; logs {self.log_path}.died-*")

    def _api_thread_died(self):
        with open(self.log_path, encoding="utf-8", errors="replace") as log:
            text = log.read()
        return all(fragment in text for fragment in self.API_THREAD_DIED)

    def _start(self, timeout):
        h.CURRENT_LOG["path"] = self.log_path
        started = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command, cwd=FORK.path, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, **h.OFFLINE_ENV}, start_new_session=True)
        while time.perf_counter() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"{FORK.name} exited with {self.process.returncode}; log {self.log_path}")
            if self._api_thread_died():
                return False
            try:
                status, _ = h.request(self.url, "GET", "/sdapi/v1/sd-models", timeout=10)
                if status == 200:
                    self.start_seconds = time.perf_counter() - started
                    return True
            except OSError:
                pass
            time.sleep(2)
        raise RuntimeError(f"{FORK.name}'s API did not answer within {timeout} s; log {self.log_path}")

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait()


def call(server, extra=None):
    payload = {**REQUEST, **(extra or {})}
    if extra and "override_settings" in extra:
        payload["override_settings"] = {**REQUEST["override_settings"], **extra["override_settings"]}
    started = time.perf_counter()
    status, body = h.request(server.url, "POST", "/sdapi/v1/txt2img", payload, timeout=1800)
    return status, body, time.perf_counter() - started


def generate(server, extra=None):
    status, body, seconds = call(server, extra)
    assert status == 200, f"txt2img answered {status}: {json.dumps(body)[:3000]}"
    return Result(body, seconds)


def expect_error(server, extra, *fragments):
    status, body, _ = call(server, extra)
    text = json.dumps(body) if not isinstance(body, str) else body
    assert status >= 400, f"expected an error, got {status}: {text[:2000]}"
    for fragment in fragments:
        assert fragment in text, f"the error does not mention {fragment!r}: {text[:2000]}"


TIMINGS = []


def timed(label, result):
    TIMINGS.append((label, result.seconds))
    return result


@pytest.fixture(scope="module")
def fork(request):
    started = time.perf_counter()
    failures_before = request.session.testsfailed
    models = os.path.join(FORK.path, "models", "Stable-diffusion")
    shared = os.environ.get("FORK_SD15_MODELS")
    if shared:  # generated once for every host (tests/e2e/make_sd15_checkpoints.py): linked, not generated again
        linked = link_shared_models(shared, models, (BASE, ACTIVE), ".rand-sd15.json", GENERATOR)
        out = subprocess.CompletedProcess([], 0, stdout=f"linked from {shared} ({len(linked)} new links)")
    else:
        linked = []
        out = subprocess.run([FORK.generator_python, GENERATOR, models, "--repos", FORK.repositories], cwd=FORK.path,
                             env={**os.environ, **h.OFFLINE_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=1800)
    assert out.returncode == 0, out.stdout[-4000:]
    link = os.path.join(FORK.path, "extensions", h.EXTENSION_NAME)
    made_link = False
    if os.path.lexists(link):
        assert os.path.realpath(link) == os.path.realpath(h.REPO_ROOT), f"{link} is not this repository"
    else:
        os.symlink(h.REPO_ROOT, link, target_is_directory=True)
        made_link = True
    server = ForkServer(ACTIVE)
    try:
        server.start()
        print(f"\n[pg-e2e-{FORK.name}] checkpoints {out.stdout.strip().splitlines()[-1]}; API after {server.start_seconds:.1f} s")
        yield server
    finally:
        server.stop()
        if made_link:
            os.unlink(link)
        for path in linked:
            os.unlink(path)
        if request.session.testsfailed == failures_before and os.path.exists(server.log_path):
            os.remove(server.log_path)  # kept (and its tail shown in the report) when a test failed
        print(f"\n[pg-e2e-{FORK.name}] fixture total {time.perf_counter() - started:.1f} s; "
              + ", ".join(f"{label} {seconds:.1f} s" for label, seconds in TIMINGS))


@pytest.fixture(scope="module")
def disabled(fork):
    return timed("disabled", generate(fork))


def test_the_extension_runs_on_the_fork(fork):
    status, scripts = h.request(fork.url, "GET", "/sdapi/v1/scripts")
    assert status == 200 and TITLE.lower() in scripts["txt2img"]
    with open(fork.log_path, encoding="utf-8", errors="replace") as f:
        log = f.read()
    assert "does not support yet" not in log and "Error loading script: personalization_guidance" not in log


def test_omega_one_is_pg_disabled_bit_for_bit(fork, disabled):
    same = timed("ω=1", generate(fork, pg(omega=1.0)))
    assert same.pixels == disabled.pixels
    assert "PG omega: 1.0" in same.infotext


@pytest.fixture(scope="module")
def pg03(fork):
    return timed("ω=0.3 (first: weak weights built)", generate(fork, pg(omega=0.3)))


def test_omega_03_changes_the_image_and_every_step_is_guided(fork, disabled, pg03):
    assert max_difference(pg03.pixels, disabled.pixels) > 10
    assert "PG omega: 0.3" in pg03.infotext and f"PG base: {BASE}" in pg03.infotext
    assert "PG skipped" not in pg03.infotext
    again = timed("ω=0.3 (cached)", generate(fork, pg(omega=0.3)))
    assert again.pixels == pg03.pixels


def test_cfg_scale_one_has_no_unconditional_pass_and_says_so(fork):
    plain = generate(fork, {"cfg_scale": 1})
    guided = generate(fork, {"cfg_scale": 1, **pg(omega=0.3)})
    assert guided.pixels == plain.pixels
    assert f"4 steps without unconditional pass ({FORK.name} ran no unconditional pass" in guided.infotext


@pytest.mark.parametrize("extra, fragments", [
    (pg(omega=0.3, base="no-such-model"), ["unknown base checkpoint 'no-such-model'"]),
    (pg(omega=0.3, base="", strip_loras="mydog"), ["'strip_loras' is set but no LoRA is active"]),
    (pg(omega=1.5), ["omega"]),
    ({**pg(omega=0.3), "prompt": "a photo of sks dog <lora:nope:1>"}, []),  # an unknown LoRA: the fork ignores it, PG runs
])
def test_bad_input_stops_the_generation(fork, extra, fragments):
    if not fragments:
        assert generate(fork, extra).size == (64, 64)
        return
    expect_error(fork, extra, *fragments)


def test_an_interrupted_generation_leaves_the_model_as_it_was(fork, disabled):
    done = {}

    def run():
        done["result"] = call(fork, {**pg(omega=0.3), "steps": 12})

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(12)
    h.request(fork.url, "POST", "/sdapi/v1/interrupt", {})
    thread.join(900)
    assert done["result"][0] == 200


def test_the_model_is_unchanged_after_success_error_and_interrupt(fork, disabled, pg03):
    after = timed("disabled again", generate(fork))
    assert after.pixels == disabled.pixels


def test_omega_zero_is_the_base_model_at_cfg_zero(fork):
    """At CFG Scale 0 the fork's image is the unconditional branch's alone (cfg_function:
    uncond + (cond − uncond)·0). With ω = 0 that branch is the base checkpoint's UNet and text
    encoder: bit for bit when the unconditional chunk runs in a UNet call of its own (a long
    negative prompt); batched with the conditional chunk, the rows of one call are split per
    layer, and the kernels round a 1-row batch differently from a 2-row one."""
    own = {"cfg_scale": 0, "negative_prompt": LONG_NEGATIVE}
    batched = {"cfg_scale": 0}
    guided_own = timed("ω=0 cfg 0 (uncond alone)", generate(fork, {**own, **pg(omega=0.0)}))
    guided_batched = generate(fork, {**batched, **pg(omega=0.0)})
    active_own = generate(fork, own)
    to_base = {"override_settings": {"sd_model_checkpoint": BASE}, "override_settings_restore_afterwards": True}
    base_own = timed("base checkpoint cfg 0 (switch)", generate(fork, {**own, **to_base}))
    base_batched = generate(fork, {**batched, **to_base})
    assert f"Model: {BASE}," in base_own.infotext
    assert guided_own.pixels == base_own.pixels
    assert max_difference(guided_batched.pixels, base_batched.pixels) <= 2
    assert max_difference(active_own.pixels, base_own.pixels) > 10
    print(f"\n[pg-e2e-{FORK.name}] ω=0 vs base at cfg 0: uncond alone {max_difference(guided_own.pixels, base_own.pixels)}, "
          f"batched {max_difference(guided_batched.pixels, base_batched.pixels)} (active vs base: "
          f"{max_difference(active_own.pixels, base_own.pixels)})")


# ---- LoRAs on the fork ------------------------------------------------------------------------
LORA = "pg-e2e-dog"
LORA_GENERATOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "make_sd15_lora.py")
LORA_PROMPT = REQUEST["prompt"] + f" <lora:{LORA}:1>"
OWN_CALL = {"cfg_scale": 0, "negative_prompt": LONG_NEGATIVE}  # the unconditional chunk in a UNet call of its own
TO_BASE = {"override_settings": {"sd_model_checkpoint": BASE}, "override_settings_restore_afterwards": True}


def strip(omega, loras=True, **more):
    return pg(omega=omega, base="", strip_loras=loras, **more)


@pytest.fixture(scope="module")
def lora(fork):
    """A random kohya LoRA of SD 1.5 shapes (tests/e2e/make_sd15_lora.py) in the fork's models/Lora,
    written with the fork's python; removed after the module."""
    folder = os.path.join(FORK.path, "models", "Lora")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LORA + ".safetensors")
    given = shared_lora("FORK_SD15_LORA", LORA) or shared_lora("FORK_SD15_MODELS", LORA)
    if given:  # make_sd15_lora.py's output for rand-sd15-ft, generated once for every host
        assert not os.path.lexists(path), f"{path} exists"
        os.symlink(given, path)
    else:
        checkpoint = os.path.join(FORK.path, "models", "Stable-diffusion", ACTIVE + ".safetensors")
        out = subprocess.run([FORK.python, LORA_GENERATOR, checkpoint, path, "--seed", "3"], cwd=FORK.path,
                             env={**os.environ, **h.OFFLINE_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stdout[-4000:]
    try:
        status, _ = h.request(fork.url, "POST", "/sdapi/v1/refresh-loras", {})
        assert status == 200
        status, loras = h.request(fork.url, "GET", "/sdapi/v1/loras")
        assert status == 200 and LORA in {entry["name"] for entry in loras}, loras
        yield path
    finally:
        os.remove(path)


@pytest.fixture(scope="module")
def lora_off(fork, lora):
    return timed("LoRA, disabled", generate(fork, {"prompt": LORA_PROMPT}))


def test_the_lora_changes_the_image(fork, disabled, lora_off):
    assert "Lora hashes" in lora_off.infotext, lora_off.infotext
    assert max_difference(lora_off.pixels, disabled.pixels) > 10, "the LoRA does not change the image: the LoRA tests would prove nothing"


def test_lora_strip_at_omega_one_is_plain_cfg(fork, lora_off):
    same = timed("LoRA strip ω=1", generate(fork, {"prompt": LORA_PROMPT, **strip(1.0)}))
    assert same.pixels == lora_off.pixels
    with_base = generate(fork, {"prompt": LORA_PROMPT, **pg(omega=1.0)})
    assert with_base.pixels == lora_off.pixels


def test_lora_strip_omega_03_changes_the_image(fork, lora_off):
    guided = timed("LoRA strip ω=0.3 (weak weights built)", generate(fork, {"prompt": LORA_PROMPT, **strip(0.3)}))
    assert max_difference(guided.pixels, lora_off.pixels) > 10
    assert "PG strip LoRAs: *" in guided.infotext and "PG base" not in guided.infotext and "PG skipped" not in guided.infotext, \
        guided.infotext
    by_name = timed("LoRA strip ω=0.3 (cached)", generate(fork, {"prompt": LORA_PROMPT, **strip(0.3, [LORA])}))
    assert by_name.pixels == guided.pixels and f"PG strip LoRAs: {LORA}" in by_name.infotext
    with open(fork.log_path, encoding="utf-8", errors="replace") as f:
        built = [line.strip() for line in f if "built weak model from the active model" in line]
    assert built, "no weak-model build logged for the LoRA"
    print(f"\n[pg-e2e-{FORK.name}] LoRA-mode weak weights: {built[-1]}")


def test_lora_strip_weak_branch_is_the_model_without_the_lora(fork, lora):
    """ω = 0 at CFG Scale 0: the image is the weak branch alone, the fork's image of the prompt
    without the LoRA: within float rounding (the layers a plain LoRA touches run the live weights
    and subtract the LoRA's low-rank output, lib_pg/hosts/common/fork_loras.py low_rank_corrections;
    bit for bit with the copy path before them) whether the unconditional chunk runs alone (a long
    negative prompt) or batched with the conditional chunk."""
    guided = timed("LoRA strip ω=0 cfg 0", generate(fork, {**OWN_CALL, "prompt": LORA_PROMPT, **strip(0.0)}))
    without = generate(fork, OWN_CALL)
    with_lora = generate(fork, {**OWN_CALL, "prompt": LORA_PROMPT})
    assert max_difference(guided.pixels, without.pixels) <= 2
    assert max_difference(with_lora.pixels, without.pixels) > 10
    batched = generate(fork, {"cfg_scale": 0, "prompt": LORA_PROMPT, **strip(0.0)})
    batched_without = generate(fork, {"cfg_scale": 0})
    assert max_difference(batched.pixels, batched_without.pixels) <= 2
    print(f"\n[pg-e2e-{FORK.name}] LoRA stripped, ω=0 vs the model without it at cfg 0: uncond alone "
          f"{max_difference(guided.pixels, without.pixels)}, batched {max_difference(batched.pixels, batched_without.pixels)} "
          f"(with vs without the LoRA: {max_difference(with_lora.pixels, without.pixels)})")


def test_base_with_a_lora_is_the_base_model_with_the_lora(fork, lora):
    """A base checkpoint and a LoRA in the prompt: the weak branch at ω = 0 is the base checkpoint
    with the same LoRA, as the fork loads it."""
    guided = timed("base + LoRA ω=0 cfg 0", generate(fork, {**OWN_CALL, "prompt": LORA_PROMPT, **pg(omega=0.0)}))
    base = timed("base checkpoint + LoRA cfg 0 (switch)", generate(fork, {**OWN_CALL, "prompt": LORA_PROMPT, **TO_BASE}))
    assert f"Model: {BASE}," in base.infotext
    assert guided.pixels == base.pixels
    print(f"\n[pg-e2e-{FORK.name}] base + LoRA, ω=0 vs the base checkpoint with the LoRA at cfg 0: "
          f"{max_difference(guided.pixels, base.pixels)}")


def test_lora_strip_errors(fork, lora):
    expect_error(fork, {"prompt": LORA_PROMPT, **strip(0.3, ["nope"])}, "not active in this prompt", "nope")
    expect_error(fork, strip(0.3), "no LoRA is active")


def test_lora_state_unchanged_after_success_error_and_interrupt(fork, disabled, lora_off):
    """After the LoRA requests (PG stripping it, a base checkpoint with it, errors) and an
    interrupted one: the fork's LoRA image and its plain image are as before."""
    done = {}

    def run():
        done["result"] = call(fork, {"prompt": LORA_PROMPT, **strip(0.3), "steps": 12})

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(12)
    h.request(fork.url, "POST", "/sdapi/v1/interrupt", {})
    thread.join(900)
    assert done["result"][0] == 200
    assert generate(fork, {"prompt": LORA_PROMPT}).pixels == lora_off.pixels
    assert timed("disabled after the LoRA tests", generate(fork)).pixels == disabled.pixels
