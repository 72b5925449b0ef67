"""Stdlib-only helpers for the end-to-end tests against a real webui 1.10.1.

Configuration comes from environment variables only:
  SD_WEBUI_PATH          the webui install (required; the tests skip without it)
  SD_WEBUI_PYTHON        its python (default: $SD_WEBUI_PATH/venv/bin/python)
  SD_WEBUI_START_TIMEOUT seconds to wait for the API (default 300)
  SD_WEBUI_EXTRA_ARGS    extra webui command-line flags (split on whitespace)
  SD_WEBUI_EXTENSIONS    a folder of third-party extension checkouts, one subfolder each (the
                         interop tests, test_interop_e2e.py, skip without it)
  OMP_NUM_THREADS        passed on to webui; when unset, webui runs with 1 (see SERVER_THREADS)
"""

import base64
import json
import os
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib

try:
    from . import make_tiny_lora
except ImportError:  # imported as a top-level module
    import make_tiny_lora

sha256_file = make_tiny_lora.sha256_file

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
GENERATOR = os.path.join(HERE, "make_tiny_checkpoints.py")
MANIFEST = ".tiny-checkpoints.json"
EXTENSION_NAME = "sd-webui-personalization-guidance"
WEBUI_VERSION = "1.10.1"
CHECKPOINTS = ("tiny-sd15", "tiny-sd15-ft", "tiny-sd15-inpaint")

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# torch's CPU thread pool in the webui server, unless OMP_NUM_THREADS is set: on a shared 2-core
# machine other processes' threads made the default pool spin, and a 64x64 tiny-model step took
# 1-20 s instead of about 0.2 s. Every comparison is within one server, so the count does not
# change what the tests assert.
SERVER_THREADS = "1"
CPU_FLAGS = [
    "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--skip-version-check",
    "--skip-python-version-check", "--no-download-sd-model", "--api", "--nowebui",
    "--use-cpu", "all", "--no-half", "--precision", "full",
]

# The log of the server the tests are talking to (conftest.py attaches its tail to failures).
CURRENT_LOG = {"path": None}


# ---- configuration ----------------------------------------------------------------------------
def skip_reason():
    """Why the e2e tests cannot run here, or None."""
    path = os.environ.get("SD_WEBUI_PATH")
    if not path:
        return "end-to-end tests need a webui 1.10.1 install: set SD_WEBUI_PATH (and SD_WEBUI_PYTHON)"
    if not os.path.isfile(os.path.join(path, "launch.py")) or not os.path.isdir(os.path.join(path, "modules")):
        return f"SD_WEBUI_PATH={path} is not a webui install (no launch.py / modules/)"
    version = webui_version(path)
    if version != WEBUI_VERSION:
        return f"SD_WEBUI_PATH={path} is webui {version or 'of unknown version'}, these tests need {WEBUI_VERSION}"
    if not os.path.isdir(os.path.join(path, "repositories", "stable-diffusion-stability-ai", "ldm")):
        return f"{path}/repositories/stable-diffusion-stability-ai/ldm is missing (webui's repositories are not set up)"
    python = webui_python()
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        return f"webui python {python} not found: set SD_WEBUI_PYTHON"
    return None


def webui_version(path):
    """The release named by the first heading of webui's CHANGELOG.md (copies need not have .git)."""
    try:
        with open(os.path.join(path, "CHANGELOG.md"), encoding="utf-8") as f:
            for line in f:
                match = re.match(r"##\s+v?(\d+\.\d+\.\d+)", line)
                if match:
                    return match.group(1)
    except OSError:
        pass
    return None


def webui_path():
    return os.path.abspath(os.environ["SD_WEBUI_PATH"])


def webui_python():
    return os.environ.get("SD_WEBUI_PYTHON") or os.path.join(os.environ["SD_WEBUI_PATH"], "venv", "bin", "python")


def models_dir():
    return os.path.join(webui_path(), "models", "Stable-diffusion")


# ---- checkpoints ------------------------------------------------------------------------------
def checkpoints_up_to_date(directory):
    """True when the generator's manifest matches this generator and every file it lists."""
    try:
        with open(os.path.join(directory, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest["generator_sha256"] != sha256_file(GENERATOR):
            return False
        names = set(manifest["files"])
        if not all(f"{c}.{ext}" in names for c in CHECKPOINTS for ext in ("safetensors", "yaml")):
            return False
        return all(sha256_file(os.path.join(directory, name)) == digest for name, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def ensure_checkpoints():
    """Generate the tiny checkpoints with the webui python unless they are already there. Returns seconds spent."""
    directory = models_dir()
    if checkpoints_up_to_date(directory):
        return 0.0
    started = time.perf_counter()
    result = subprocess.run(
        [webui_python(), GENERATOR, directory, "--repos", os.path.join(webui_path(), "repositories")],
        cwd=webui_path(), env={**os.environ, **OFFLINE_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=900)
    if result.returncode != 0 or not checkpoints_up_to_date(directory):
        raise RuntimeError(f"make_tiny_checkpoints.py failed (rc {result.returncode}):\n{result.stdout[-6000:]}")
    return time.perf_counter() - started


# ---- LoRA files ------------------------------------------------------------------------------
def lora_dir():
    return os.path.join(webui_path(), "models", "Lora")


def install_lora(name, checkpoint="tiny-sd15-ft", **options):
    """Write tests/e2e/make_tiny_lora.py's LoRA for `checkpoint` as models/Lora/<name>.safetensors.
    Returns (path, created, {kohya layer name: module path}): created is False when an identical
    file was already there (then leave it at teardown); a different file of that name is an error
    (the tests would run someone else's LoRA)."""
    os.makedirs(lora_dir(), exist_ok=True)
    path = os.path.join(lora_dir(), name + ".safetensors")
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", suffix=".part", dir=lora_dir())  # not a name webui lists
    os.close(fd)
    try:
        layers = make_tiny_lora.write_lora(os.path.join(models_dir(), checkpoint + ".safetensors"), tmp, name=name, **options)
        if os.path.exists(path):
            if sha256_file(path) != sha256_file(tmp):
                raise RuntimeError(f"{path} exists and is not the tests' LoRA: remove it or rename it")
            return path, False, layers
        os.replace(tmp, path)
        return path, True, layers
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---- the extension link -----------------------------------------------------------------------
def link_extension():
    """Symlink this repository into webui's extensions folder. Returns the link path if we made it, else None."""
    return link_into_extensions(REPO_ROOT, EXTENSION_NAME)


def link_into_extensions(source, name):
    """Symlink folder `source` as webui's extensions/<name>. Returns the link path if we made it,
    None if that very link was already there; anything else of that name is an error."""
    link = os.path.join(webui_path(), "extensions", name)
    if os.path.lexists(link):
        if not os.path.islink(link) or os.path.realpath(link) != os.path.realpath(source):
            raise RuntimeError(f"{link} exists and is not a link to {source}: the tests would run other code")
        return None
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(source, link, target_is_directory=True)
    return link


# ---- third-party extensions (tests/e2e/test_interop_e2e.py) -----------------------------------
def extensions_source():
    """The folder named by SD_WEBUI_EXTENSIONS, or None."""
    path = os.environ.get("SD_WEBUI_EXTENSIONS")
    return os.path.abspath(path) if path else None


def interop_skip_reason():
    """Why the interop tests cannot run here, or None."""
    reason = skip_reason()
    if reason:
        return reason
    source = extensions_source()
    if not source:
        return ("interop tests need third-party extension checkouts: set SD_WEBUI_EXTENSIONS to a folder "
                "holding one subfolder per extension")
    if not os.path.isdir(source):
        return f"SD_WEBUI_EXTENSIONS={source} is not a folder"
    return None


def available_extensions():
    """{subfolder name: path} of the extension checkouts in SD_WEBUI_EXTENSIONS."""
    source = extensions_source()
    return {name: os.path.join(source, name) for name in sorted(os.listdir(source))
            if os.path.isdir(os.path.join(source, name)) and not name.startswith(".")}


def extension_revision(path):
    """The checkout's git commit (short), or None when it is not the top of a git work tree."""
    try:
        result = subprocess.run(["git", "-C", path, "rev-parse", "--show-toplevel", "--short=8", "HEAD"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = result.stdout.split()
    if result.returncode != 0 or len(lines) != 2 or os.path.realpath(lines[0]) != os.path.realpath(path):
        return None  # not a checkout, or a folder inside some other repository
    return lines[1]


def unlink_extension(link):
    if link and os.path.islink(link):
        os.unlink(link)


# ---- the server -------------------------------------------------------------------------------
def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebuiServer:
    """webui API-only on a free loopback port, in its own process group."""

    def __init__(self, checkpoint="tiny-sd15-ft", ui=False, extra_args=()):
        """ui=False: API only (--nowebui); ui=True: the gradio UI too (--api), as most users run it."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        fd, self.log_path = tempfile.mkstemp(prefix="pg-e2e-webui-", suffix=".log")
        os.close(fd)
        ckpt = os.path.join(models_dir(), checkpoint + ".safetensors")
        flags = [flag for flag in CPU_FLAGS if not (ui and flag == "--nowebui")]
        self.command = [webui_python(), "launch.py", *flags, "--server-name", "127.0.0.1",
                        "--port", str(self.port), "--ckpt", ckpt, *extra_args,
                        *shlex.split(os.environ.get("SD_WEBUI_EXTRA_ARGS", ""))]
        self.process = None
        self.start_seconds = None

    def start(self, timeout=None):
        timeout = float(timeout or os.environ.get("SD_WEBUI_START_TIMEOUT", 300))
        CURRENT_LOG["path"] = self.log_path
        started = time.perf_counter()
        with open(self.log_path, "wb") as log:
            env = {"OMP_NUM_THREADS": SERVER_THREADS, **os.environ, **OFFLINE_ENV}
            self.process = subprocess.Popen(self.command, cwd=webui_path(), env=env,
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = started + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"webui exited with code {self.process.returncode} before its API answered\n{self.log_tail()}")
            # With the gradio UI, webui adds the API routes to an app that is already serving and
            # only then fills the API's default script arguments (modules/api/api.py Api.__init__)
            # and runs the extensions' app_started callbacks (which add their own routes): a
            # txt2img request in between fails with "'Api' object has no attribute
            # 'default_script_arg_txt2img'". webui prints "Startup time:" after all of that (in
            # both modes), so wait for the line as well as for an answer.
            try:
                status, _ = request(self.url, "GET", "/sdapi/v1/sd-models", timeout=5)
                if status == 200 and "Startup time:" in self.log_text():
                    break
            except OSError:
                pass
            if time.perf_counter() > deadline:
                raise RuntimeError(f"webui's API did not answer within {timeout:.0f} s\n{self.log_tail()}")
            time.sleep(0.25)
        self.start_seconds = time.perf_counter() - started
        return self

    def stop(self):
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 20)):
            try:
                os.killpg(process.pid, sig)  # the group we created with start_new_session
            except ProcessLookupError:
                return
            try:
                process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def remove_log(self):
        if CURRENT_LOG["path"] == self.log_path:
            CURRENT_LOG["path"] = None
        try:
            os.remove(self.log_path)
        except OSError:
            pass

    def log_text(self):
        """The server's whole log so far ('' if unreadable)."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log_size(self):
        """The log's length so far, in characters: pass it to log_since() to read what a request printed."""
        return len(self.log_text())

    def log_since(self, offset):
        return self.log_text()[offset:]

    def log_tail(self, chars=20000):
        if not os.path.exists(self.log_path):
            return "(no webui log)"
        return f"---- webui log {self.log_path} (last {chars} chars) ----\n{self.log_text()[-chars:]}"


def read_log_tail(chars=20000):
    path = CURRENT_LOG["path"]
    if not path:
        return None
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return None


# ---- HTTP (urllib, no proxies: the server is on loopback) -------------------------------------
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def request(base_url, method, path, payload=None, timeout=600):
    """(status, body) where body is the parsed JSON, or the text when it is not JSON."""
    data = json.dumps(payload).encode("utf-8") if payload is not None else None
    req = urllib.request.Request(base_url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data is not None else {})
    try:
        with _OPENER.open(req, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    text = raw.decode("utf-8", errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


# ---- scripts' API arguments -------------------------------------------------------------------
def alwayson_defaults(server, title, img2img=False):
    """The default `args` of an always-on script, as webui's /sdapi/v1/script-info lists them
    (the values its ui() returned), with the labels beside them: [(label, value), ...]."""
    status, info = request(server.url, "GET", "/sdapi/v1/script-info")
    if status != 200:
        raise RuntimeError(f"/sdapi/v1/script-info answered {status}: {str(info)[:2000]}")
    for entry in info:
        if entry["name"] == title.lower() and entry["is_alwayson"] and bool(entry["is_img2img"]) == img2img:
            return [(arg.get("label"), arg.get("value")) for arg in entry["args"]]
    raise KeyError(f"no always-on script {title!r} ({'img2img' if img2img else 'txt2img'}) on this server")


def alwayson_args(defaults, changes):
    """`defaults` (from alwayson_defaults) with `changes` {index: value} applied, as a list of values;
    each changed index's label is checked when `changes` gives (label, value)."""
    values = [value for _label, value in defaults]
    for index, change in changes.items():
        if isinstance(change, tuple):
            label, value = change
            if defaults[index][0] != label:
                raise AssertionError(f"argument {index} is {defaults[index][0]!r}, expected {label!r}: "
                                     "the extension's UI changed, update the test")
        else:
            value = change
        values[index] = value
    return values


# ---- PNG (8-bit, non-interlaced; enough for what webui's API returns) --------------------------
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # grey, RGB, grey+alpha, RGBA


def decode_png(data):
    """(width, height, channels, pixels as bytes, rows top to bottom) of an 8-bit PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    width, height, depth, color, _compression, _filter, interlace = header
    if depth != 8 or color not in _CHANNELS or interlace != 0:
        raise ValueError(f"unsupported PNG: depth {depth}, colour type {color}, interlace {interlace}")
    bpp = _CHANNELS[color]
    stride = width * bpp
    raw = zlib.decompress(b"".join(idat))
    out = bytearray()
    previous = bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif kind == 2:
            for i in range(stride):
                line[i] = (line[i] + previous[i]) & 0xFF
        elif kind == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + previous[i]) >> 1)) & 0xFF
        elif kind == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b = previous[i]
                c = previous[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 0xFF
        elif kind != 0:
            raise ValueError(f"bad PNG filter type {kind}")
        out += line
        previous = line
    return width, height, bpp, bytes(out)


def encode_png(width, height, rgb):
    """An 8-bit RGB PNG (filter 0) from width*height*3 bytes."""
    assert len(rgb) == width * height * 3

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + rgb[y * width * 3:(y + 1) * width * 3] for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


def b64_png(width, height, rgb):
    return base64.b64encode(encode_png(width, height, rgb)).decode("ascii")


def image_pixels(b64):
    """Pixels of a base64 PNG from the API, as RGB bytes (alpha dropped, grey expanded)."""
    if "," in b64[:64] and b64.startswith("data:"):
        b64 = b64.split(",", 1)[1]
    width, height, channels, pixels = decode_png(base64.b64decode(b64))
    if channels == 3:
        rgb = pixels
    elif channels == 4:
        rgb = bytes(b for i, b in enumerate(pixels) if i % 4 != 3)
    else:
        grey = pixels[::channels]
        rgb = bytes(v for g in grey for v in (g, g, g))
    return (width, height), rgb


def log(message):
    print(f"[pg-e2e] {message}", file=sys.stderr, flush=True)
