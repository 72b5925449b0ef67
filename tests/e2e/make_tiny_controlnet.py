#!/usr/bin/env python
"""Write a tiny, randomly initialised SD1 ControlNet for the e2e tiny UNet (make_tiny_checkpoints.py).

Run with the WEBUI's python (torch, safetensors); the ControlNet class comes from the ControlNet
extension's own code (scripts/cldm.py), so the file's keys are exactly the ones it loads:

    $SD_WEBUI_PYTHON tests/e2e/make_tiny_controlnet.py OUT.safetensors --controlnet EXT_DIR
        --repos $SD_WEBUI_PATH/repositories --config '{"model_channels": 32, ...}' [--seed 0]

Why this shape: sd-webui-controlnet builds every SD1 ControlNet from one hard-coded config dict
(scripts/controlnet_model_guess.py controlnet_default_config; the tests point it at --config
before any model loads) and its UNet hook adds 13 control outputs to SD1.5's 12 skips and middle
block (scripts/hook.py: the middle block takes the last one, output block i the skip popped with
entry 11 - i). The tiny UNet has 9 skips (channels 32,32,32,32,64,64,64,64,64) and a 64-channel
middle block, so a ControlNet with four levels of channels (32, 32, 64, 64) and two res blocks each
has 12 + 1 outputs whose entries 3..12 line up channel for channel with those skips and the middle
block (entries 0..2 are never used, as SD1.5's hook would leave nothing for them either; spatial
sizes differ and the hook resizes them, scripts/hook.py aligned_adding).
Every parameter is random (no zero convolutions), so the control changes the image clearly.
"""
import argparse
import json
import os
import sys
import types

from make_tiny_checkpoints import save_sorted_safetensors  # sibling (imports only make_tiny_lora at top level)


def build(controlnet_dir, repos, config, seed):
    import torch

    for repo in ("generative-models", "stable-diffusion-stability-ai"):
        sys.path.insert(0, os.path.join(repos, repo))
    sys.path.insert(0, controlnet_dir)
    # scripts/cldm.py imports webui's `modules.devices` but uses it only when moving models between
    # devices: a stand-in keeps webui itself out of this process.
    stub = types.ModuleType("modules")
    stub.devices = types.SimpleNamespace(get_device_for=lambda _task: "cpu")
    sys.modules.setdefault("modules", stub)
    # The extension's scripts/ has no __init__.py, and generative-models has a regular `scripts`
    # package that would win the import: name the extension's folder as `scripts` explicitly.
    package = types.ModuleType("scripts")
    package.__path__ = [os.path.join(controlnet_dir, "scripts")]
    sys.modules["scripts"] = package
    from scripts.cldm import ControlNet  # noqa: E402  (the extension's class)

    torch.manual_seed(seed)
    net = ControlNet(**{**config, "hint_channels": 3, "use_fp16": False}).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in sorted(net.named_parameters()):
            if param.numel() and bool((param == param.flatten()[0]).all()):  # zero convs, norms: jitter
                value = param.flatten()[0].item()
                param.add_((0.1 if value != 0 else 0.05) * torch.randn(param.shape, generator=generator))
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--controlnet", required=True, help="the sd-webui-controlnet checkout")
    ap.add_argument("--repos", required=True, help="webui's repositories folder")
    ap.add_argument("--config", required=True, help="JSON: the values for controlnet_default_config")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    config = json.loads(a.config)
    state = build(os.path.abspath(a.controlnet), os.path.abspath(a.repos), config, a.seed)
    tmp = a.out + ".part"
    save_sorted_safetensors(state, tmp)
    os.replace(tmp, a.out)
    zero_convs = sorted(k for k in state if k.startswith("zero_convs.") and k.endswith(".weight"))
    print(f"{a.out}: {len(state)} tensors, {sum(v.numel() for v in state.values())} params, "
          f"{len(zero_convs)} zero convs + middle block out")


if __name__ == "__main__":
    main()
