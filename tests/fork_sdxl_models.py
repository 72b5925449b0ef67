"""SDXL as the Forge-family forks hold it, for their fakes (tests/fake_forge, tests/fake_reforge).

Both forks convert an SDXL checkpoint's text encoders at load into the Hugging Face layout (OpenCLIP
bigG's fused attention split into q/k/v, its projection transposed or kept bare) and encode prompts
with them: the cross-attention context is CLIP-L's and bigG's penultimate layer side by side, the
pooled vector bigG's final-norm EOS token through its projection, followed by the size embeddings
(Forge backend/diffusion_engine/sdxl.py:86-121, reForge modules/sd_models_xl.py:15-38 with
modules_forge/forge_clip.py:106-124). `ForkSDXL` is that front end over the tiny SDXL of
tests/ldm_models.py (the sgm UNet with ldm names); each fork's fake builds its own text-encoder
modules and projection (forge_host.make_sdxl_model, reforge_host.make_sdxl_model), so the key
space PG sees is the fork's. The empty negative prompt is zeroed by FakeSdModel, as both forks do.
"""

import torch
from torch import nn

from tests.ldm_models import CLIPTextEncoder, UNetModel, encode_prompts, sdxl_unet_config, timestep_embedding

UNET = "model.diffusion_model."
TEXT_FILE_PREFIXES = ("conditioner.embedders.",)


def hf_text_model(encoder):
    """The Hugging Face CLIPTextModel stand-in (`.text_model...`) of the tiny SDXL's CLIP-L or bigG."""
    if encoder == "clip_l":
        return CLIPTextEncoder(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64).transformer
    return CLIPTextEncoder(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, hidden_act="gelu").transformer


def tiny_unet(state):
    unet = UNetModel(**sdxl_unet_config("tiny"))
    unet.load_state_dict({k[len(UNET):]: v for k, v in state.items() if k.startswith(UNET)})
    return unet


def text_state(state):
    """A fresh dict of a checkpoint's text-encoder tensors (what process_clip_state_dict gets)."""
    return {k: v.clone() for k, v in state.items() if k.startswith(TEXT_FILE_PREFIXES)}


def _hidden_states(transformer, ids):
    text_model = transformer.text_model
    x = text_model.embeddings(ids)
    out = [x]
    for layer in text_model.encoder.layers:
        x = layer(x)
        out.append(x)
    return out


class _DiffusionWrapper(nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model


class ForkSDXL(nn.Module):
    """The fork's SDXL front end: `model.diffusion_model`, the text-encoder patcher's model
    (`text_encoders["clip_l" | "clip_g"].transformer`), `project(pooled)` the fork's projection of
    bigG's pooled output, `conditioner` what the front end keeps of sgm's (reForge) or None (Forge)."""

    def __init__(self, unet, text_encoders, project, conditioner=None, size_embed_dim=16):
        super().__init__()
        self.model = _DiffusionWrapper(unet)
        self.text_encoders = text_encoders
        self.project = project
        self.conditioner = conditioner
        self.size_embed_dim = size_embed_dim

    def get_learned_conditioning(self, prompts, width=1024, height=1024):
        if isinstance(prompts, str):
            prompts = [prompts]
        ids_l, ids_g = encode_prompts(prompts), encode_prompts(prompts, pad_token=0)
        hidden_l = _hidden_states(self.text_encoders["clip_l"].transformer, ids_l)
        hidden_g = _hidden_states(self.text_encoders["clip_g"].transformer, ids_g)
        last = self.text_encoders["clip_g"].transformer.text_model.final_layer_norm(hidden_g[-1])
        pooled = self.project(last[torch.arange(last.shape[0]), ids_g.argmax(dim=-1)]).to(last.dtype)
        b = len(prompts)
        sizes = [torch.tensor([[height, width]] * b), torch.tensor([[0, 0]] * b), torch.tensor([[height, width]] * b)]
        flat = [timestep_embedding(s.reshape(-1), self.size_embed_dim).reshape(b, -1).to(pooled.dtype) for s in sizes]
        return {"crossattn": torch.cat([hidden_l[-2], hidden_g[-2]], dim=2), "vector": torch.cat([pooled] + flat, dim=1)}
