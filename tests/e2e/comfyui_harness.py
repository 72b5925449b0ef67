"""A real ComfyUI, headless on the CPU, driven through its /prompt API (tests/e2e/test_comfyui_e2e.py, bench/comfyui.py).

COMFYUI_PATH is a ComfyUI checkout (Comfy-Org/ComfyUI, v0.3.64 @ a125cd84 or later) and COMFYUI_PYTHON
the python of its environment (default: $COMFYUI_PATH/venv/bin/python). This repository is linked into
$COMFYUI_PATH/custom_nodes/ and the server is started with --cpu on the loopback interface, its outputs in
a temporary folder. Random real-shape SD 1.5 checkpoints (tests/e2e/make_sd15_checkpoints.py, which needs
ldm from Stability-AI/stablediffusion: COMFYUI_SD_REPOS is a folder holding it as
stable-diffusion-stability-ai/) and a random subject LoRA (make_sd15_lora.py) are generated into
$COMFYUI_PATH/models when missing. COMFYUI_ARGS: more arguments for ComfyUI's main.py (e.g. --bf16-unet).
"""

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
NODE_LINK = "personalization_guidance"
BASE = "rand-sd15.safetensors"
ACTIVE = "rand-sd15-ft.safetensors"
LORA = "rand-sd15-subject.safetensors"


def settings_from_env():
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        return None, "the ComfyUI end-to-end tests need a ComfyUI install: set COMFYUI_PATH (and COMFYUI_PYTHON)"
    if not os.path.isfile(os.path.join(path, "main.py")) or not os.path.isdir(os.path.join(path, "comfy")):
        return None, f"COMFYUI_PATH={path} is not a ComfyUI checkout (no main.py and comfy/)"
    python = os.environ.get("COMFYUI_PYTHON") or os.path.join(path, "venv", "bin", "python")
    return (path, python), None


def ensure_models(path, python):
    checkpoints = os.path.join(path, "models", "checkpoints")
    loras = os.path.join(path, "models", "loras")
    repos = os.environ.get("COMFYUI_SD_REPOS")
    if not all(os.path.isfile(os.path.join(checkpoints, name)) for name in (BASE, ACTIVE)):
        if not repos:
            raise RuntimeError(f"{BASE}/{ACTIVE} are missing in {checkpoints}: set COMFYUI_SD_REPOS to a folder with "
                               "stable-diffusion-stability-ai/ (ldm) so make_sd15_checkpoints.py can generate them")
        subprocess.run([python, os.path.join(HERE, "make_sd15_checkpoints.py"), checkpoints, "--repos", repos], check=True)
    if not os.path.isfile(os.path.join(loras, LORA)):
        os.makedirs(loras, exist_ok=True)
        subprocess.run([python, os.path.join(HERE, "make_sd15_lora.py"), os.path.join(checkpoints, BASE),
                        os.path.join(loras, LORA)], check=True)


class ComfyUI:
    """One ComfyUI server process and its output folder."""

    def __init__(self, path, python, port=None):
        self.path, self.python = path, python
        self.port = port or 8188 + os.getpid() % 500
        self.url = f"http://127.0.0.1:{self.port}"
        self.out = tempfile.mkdtemp(prefix="pg-comfyui-")
        self.log_path = os.path.join(self.out, "server.log")
        self.process = None
        self.nonce = 0
        self.extra_args = os.environ.get("COMFYUI_ARGS", "").split()  # e.g. --bf16-unet

    def start(self, timeout=180):
        link = os.path.join(self.path, "custom_nodes", NODE_LINK)
        if not os.path.exists(link):
            os.symlink(REPO, link)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE")
        log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
             "--output-directory", os.path.join(self.out, "output"), "--temp-directory", os.path.join(self.out, "temp")]
            + self.extra_args,
            cwd=self.path, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited at start-up:\n{self.log_tail()}")
            try:
                self.get("/object_info/KSampler")
                return self
            except (urllib.error.URLError, ConnectionError):
                time.sleep(1)
        raise RuntimeError(f"ComfyUI did not answer in {timeout} s:\n{self.log_tail()}")

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.out, ignore_errors=True)

    def log_tail(self, chars=4000):
        try:
            with open(self.log_path) as f:
                return f.read()[-chars:]
        except OSError:
            return ""

    def get(self, route):
        with urllib.request.urlopen(self.url + route, timeout=30) as response:
            return json.loads(response.read())

    def post(self, route, body):
        request = urllib.request.Request(self.url + route, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def run(self, workflow, timeout=900):
        """Queue an API-format workflow; returns (history entry, seconds). A changing input on every
        node that has inputs keeps ComfyUI from serving the run from its cache."""
        self.nonce += 1
        workflow = json.loads(json.dumps(workflow))
        for node in workflow.values():
            if node["class_type"] in ("KSampler", "KSamplerAdvanced", "SamplerCustomAdvanced", "SamplerCustom"):
                node["inputs"]["pg_e2e_nonce"] = self.nonce
        started = time.perf_counter()
        status, body = self.post("/prompt", {"prompt": workflow, "client_id": uuid.uuid4().hex})
        if status != 200:
            return {"status": {"status_str": "rejected", "messages": [], "rejected": body}}, 0.0
        prompt_id = body["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"].get("completed") or entry["status"].get("status_str") == "error"):
                return entry, time.perf_counter() - started
            time.sleep(0.2)
        raise TimeoutError(f"ComfyUI did not finish prompt {prompt_id} in {timeout} s")

    def latent(self, entry, node_id):
        """The latent a SaveLatent node wrote (its `latent_tensor`), as a float32 numpy array."""
        from safetensors.numpy import load_file

        info = entry["outputs"][node_id]["latents"][0]
        return load_file(os.path.join(self.out, "output", info.get("subfolder", ""), info["filename"]))["latent_tensor"]

    def image(self, entry, node_id):
        """The first image a SaveImage node wrote, as a uint8 array (decoded by ComfyUI's python: PIL)."""
        images = entry["outputs"][node_id]["images"]
        info = images[0]
        png = os.path.join(self.out, "output", info.get("subfolder", ""), info["filename"])
        npy = png + ".npy"
        subprocess.run([self.python, "-c", "import sys, numpy; from PIL import Image; "
                        "numpy.save(sys.argv[2], numpy.asarray(Image.open(sys.argv[1]).convert('RGB')))", png, npy], check=True)
        return np.load(npy)


def error_message(entry):
    """The execution error ComfyUI reports for a run (None when it succeeded)."""
    status = entry.get("status", {})
    if "rejected" in status:
        return json.dumps(status["rejected"])
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_message')}"
    return None


def max_difference(a, b):
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# -- API-format workflows -------------------------------------------------------

def txt2img(checkpoint=ACTIVE, positive="a photo of sks dog on the beach", negative="blurry", cfg=5.0, steps=3, seed=1234,
            size=64, sampler="euler", scheduler="normal", pg=None, lora=None, weak_negative=None, reference=None):
    """A KSampler workflow. `pg`: the Personalization Guidance node's inputs (model wired in);
    `lora`: (name, strength) applied to the checkpoint's model and CLIP; `reference`: a checkpoint whose
    MODEL is wired to reference_model ("lora-free" for the checkpoint before the LoRA loader);
    `weak_negative`: the CLIP for the PG text-encode node's reference_clip ("base": `reference`'s
    loader, or the checkpoint before the LoRA)."""
    w = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "pg"}},
    }
    model, clip = ["1", 0], ["1", 1]
    if lora is not None:
        w["20"] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": clip, "lora_name": lora[0],
                                                         "strength_model": lora[1], "strength_clip": lora[1]}}
        model, clip = ["20", 0], ["20", 1]
    w["2"] = {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": clip}}
    w["3"] = {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": clip}}
    reference_model = reference_clip = None
    if reference == "lora-free":
        reference_model, reference_clip = ["1", 0], ["1", 1]
    elif reference is not None:
        w["30"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": reference}}
        reference_model, reference_clip = ["30", 0], ["30", 1]
    if weak_negative is not None:
        if reference_clip is None:
            w["30"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": weak_negative}}
            reference_clip = ["30", 1]
        w["3"] = {"class_type": "PersonalizationGuidanceTextEncode",
                  "inputs": {"text": negative, "clip": clip, "reference_clip": reference_clip}}
    if pg is not None:
        inputs = {"model": model, "omega": 0.5, "base_checkpoint": "None", "schedule": "constant", "omega_end": 0.5,
                  "start": 0.0, "end": 1.0, "weights": "auto", **pg}
        if reference_model is not None:
            inputs["reference_model"] = reference_model
        w["10"] = {"class_type": "PersonalizationGuidance", "inputs": inputs}
        model = ["10", 0]
    w["5"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}}
    return w


# -- a tiny SD3-style model (tests/e2e/make_tiny_sd3.py) -------------------------------------------

SD3_UNET = "tiny-sd3.safetensors"
SD3_LORA = "tiny-sd3-subject.safetensors"
SD3_CLIP = "tiny-sd3-clip-l.safetensors"
FLUX_UNET = "one-block-flux-dev.safetensors"


def ensure_tiny_sd3(path, python):
    models = os.path.join(path, "models")
    wanted = [os.path.join(models, "diffusion_models", SD3_UNET), os.path.join(models, "loras", SD3_LORA),
              os.path.join(models, "text_encoders", SD3_CLIP), os.path.join(models, "diffusion_models", FLUX_UNET)]
    if not all(os.path.isfile(f) for f in wanted):
        clip_from = os.path.join(models, "checkpoints", BASE)
        if not os.path.isfile(clip_from):
            raise RuntimeError(f"{clip_from} is missing: the tiny SD3 model borrows its CLIP-L text encoder")
        subprocess.run([python, os.path.join(HERE, "make_tiny_sd3.py"), models, "--clip-from", clip_from, "--flux"], cwd=path,
                       check=True)


def sd3_txt2latent(positive="a photo of sks dog on the beach", negative="blurry", cfg=4.0, steps=3, seed=1234, size=64,
                   lora=None, pg=None, weak_negative=False, sampler="euler", scheduler="simple"):
    """A KSampler workflow on the tiny SD3 model, its latent saved (node "7"). `lora`: a strength for the
    subject LoRA (LoraLoaderModelOnly); `pg`: the PG node's inputs, the model before the LoRA loader as
    reference_model; `weak_negative`: the negative through the PG text-encode node (same CLIP as reference)."""
    w = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": SD3_UNET, "weight_dtype": "default"}},
        "11": {"class_type": "CLIPLoader", "inputs": {"clip_name": SD3_CLIP, "type": "sd3"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["11", 0]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["11", 0]}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "pg-sd3"}},
    }
    model = ["1", 0]
    if lora is not None:
        w["20"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": SD3_LORA, "strength_model": lora}}
        model = ["20", 0]
    if weak_negative:
        w["3"] = {"class_type": "PersonalizationGuidanceTextEncode",
                  "inputs": {"text": negative, "clip": ["11", 0], "reference_clip": ["11", 0]}}
    if pg is not None:
        w["10"] = {"class_type": "PersonalizationGuidance", "inputs": {
            "model": model, "omega": 0.5, "base_checkpoint": "None", "schedule": "constant", "omega_end": 0.5, "start": 0.0,
            "end": 1.0, "weights": "auto", "reference_model": ["1", 0], **pg}}
        model = ["10", 0]
    w["5"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
        "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}}
    return w
