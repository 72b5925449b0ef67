"""Randomly initialised Stable Diffusion stand-ins with real ldm / sgm key layouts.

Pure torch + numpy.  The parameter names, shapes and state-dict order of
``UNetModel`` match ``ldm.modules.diffusionmodules.openaimodel.UNetModel``
(Stability-AI/stablediffusion, used by AUTOMATIC1111 webui for SD1/SD2) and
``sgm.modules.diffusionmodules.openaimodel.UNetModel`` (SDXL); the text
encoders use the HuggingFace ``CLIPTextModel`` and open_clip key names.

Every parametrised op is a plain ``torch.nn`` layer (Linear, Conv2d, GroupNorm,
LayerNorm, Embedding, MultiheadAttention) and always gets a batch-first input
whose dim 0 is the model batch, so per-module patching (LoRA etc.) works.
Attention goes through ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "timestep_embedding", "GroupNorm32", "ResBlock", "Downsample", "Upsample",
    "CrossAttention", "GEGLU", "FeedForward", "BasicTransformerBlock",
    "SpatialTransformer", "TimestepEmbedSequential", "UNetModel",
    "CLIPTextEncoder", "OpenCLIPTextEncoder", "FirstStageStandIn",
    "SD1Model", "SDXLModel", "sd1_unet_config", "sdxl_unet_config",
    "make_sd1", "make_sdxl", "make_sdxl_unet", "make_sdxl_like_state_dict",
    "init_random_", "state_dict_checksum", "save_checkpoint", "encode_prompts",
    "BOS_TOKEN", "EOS_TOKEN", "VOCAB_SIZE", "MAX_LENGTH",
]

VOCAB_SIZE = 49408
MAX_LENGTH = 77
BOS_TOKEN = 49406
EOS_TOKEN = 49407


# ----------------------------------------------------------------------------
# UNet building blocks (ldm openaimodel / attention layouts)
# ----------------------------------------------------------------------------

def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin], float32, same formula as ldm."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half
    ).to(device=timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back to the input dtype (ldm)."""

    def forward(self, x):
        if self.weight is None or self.weight.dtype == torch.float32:
            return super().forward(x.float()).type(x.dtype)
        # low-precision parameters without autocast: upcast them as well
        return F.group_norm(x.float(), self.num_groups, self.weight.float(),
                            self.bias.float(), self.eps).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


class TimestepBlock(nn.Module):
    """Marker: forward(x, emb)."""


class Upsample(nn.Module):
    def __init__(self, channels, use_conv=True, out_channels=None, padding=1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=padding)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    def __init__(self, channels, use_conv=True, out_channels=None, padding=1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=padding)
        else:
            assert self.channels == self.out_channels
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x):
        return self.op(x)


class ResBlock(TimestepBlock):
    def __init__(self, channels, emb_channels, dropout=0.0, out_channels=None,
                 use_conv=False, use_scale_shift_norm=False):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            nn.Conv2d(channels, self.out_channels, 3, padding=1),
        )
        self.updown = False
        self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while emb_out.dim() < h.dim():
            emb_out = emb_out[..., None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
            h = out_rest(h)
        else:
            h = h + emb_out
            h = self.out_layers(h)
        return self.skip_connection(x) + h


def _sdpa_heads(q, k, v, heads, is_causal=False):
    """(B, N, H*D) x3 -> (B, N, H*D) via SDPA on (B, H, N, D); batch stays dim 0."""
    b, n, inner = q.shape
    d = inner // heads
    q = q.view(b, n, heads, d).transpose(1, 2)
    k = k.view(b, k.shape[1], heads, d).transpose(1, 2)
    v = v.view(b, v.shape[1], heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    return out.transpose(1, 2).reshape(b, n, inner)


class CrossAttention(nn.Module):
    def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64, dropout=0.0):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.scale = dim_head ** -0.5
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x, context=None, mask=None):
        if mask is not None:
            raise NotImplementedError("attention masks are not supported")
        context = x if context is None else context
        q = self.to_q(x)
        k = self.to_k(context)
        v = self.to_v(context)
        return self.to_out(_sdpa_heads(q, k, v, self.heads))


class GEGLU(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, dim_out=None, mult=4, glu=True, dropout=0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim if dim_out is None else dim_out
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, d_head, dropout=0.0, context_dim=None,
                 gated_ff=True, disable_self_attn=False):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(dim, context_dim=context_dim if disable_self_attn else None,
                                    heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads,
                                    dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context=None):
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context=context) + x
        x = self.ff(self.norm3(x)) + x
        return x


class SpatialTransformer(nn.Module):
    def __init__(self, in_channels, n_heads, d_head, depth=1, dropout=0.0, context_dim=None,
                 disable_self_attn=False, use_linear=False):
        super().__init__()
        if not isinstance(context_dim, (list, tuple)):
            context_dim = [context_dim] * depth
        elif len(context_dim) != depth:
            context_dim = [context_dim[0]] * depth
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim[d],
                                  disable_self_attn=disable_self_attn)
            for d in range(depth)
        ])
        if use_linear:
            self.proj_out = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1, stride=1, padding=0)
        self.use_linear = use_linear

    def forward(self, x, context=None):
        if not isinstance(context, (list, tuple)):
            context = [context]
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, -1).contiguous()
        if self.use_linear:
            x = self.proj_in(x)
        for i, block in enumerate(self.transformer_blocks):
            x = block(x, context=context[i if len(context) > 1 else 0])
        if self.use_linear:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    def forward(self, x, emb, context=None):
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """ldm/sgm openaimodel.UNetModel (spatial-transformer variant only).

    Extra ldm config keys (image_size, use_checkpoint, legacy, use_fp16,
    use_spatial_transformer, spatial_transformer_attn_type, ...) are accepted
    and ignored so ldm yaml ``params`` can be passed straight through.
    """

    def __init__(self, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=2,
                 attention_resolutions=(4, 2, 1), dropout=0.0, channel_mult=(1, 2, 4, 4),
                 conv_resample=True, num_classes=None, num_heads=-1, num_head_channels=-1,
                 use_scale_shift_norm=False, transformer_depth=1, context_dim=None,
                 disable_self_attentions=None, disable_middle_self_attn=False,
                 use_linear_in_transformer=False, adm_in_channels=None, **ignored):
        super().__init__()
        for k, v in ignored.items():
            if k in ("resblock_updown", "use_new_attention_order", "num_attention_blocks", "n_embed",
                     "disable_middle_transformer") and v:
                raise NotImplementedError(f"{k}={v!r} is not supported")
        if dims := ignored.get("dims", 2):
            assert dims == 2, "only 2D UNets are supported"
        assert context_dim is not None, "only the cross-attention (spatial transformer) UNet is supported"
        assert num_heads != -1 or num_head_channels != -1
        if isinstance(context_dim, (list, tuple)):
            context_dim = list(context_dim)
        if isinstance(num_res_blocks, int):
            num_res_blocks = [num_res_blocks] * len(channel_mult)
        if isinstance(transformer_depth, int):
            transformer_depth = [transformer_depth] * len(channel_mult)
        transformer_depth = list(transformer_depth)
        transformer_depth_middle = transformer_depth[-1]

        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = list(num_res_blocks)
        self.attention_resolutions = tuple(attention_resolutions)
        self.channel_mult = tuple(channel_mult)
        self.num_classes = num_classes
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.transformer_depth = transformer_depth
        self.context_dim = context_dim
        self.use_linear_in_transformer = use_linear_in_transformer
        self.adm_in_channels = adm_in_channels
        # dtype the input is cast to (ldm: float32 unless use_fp16); None = parameter dtype
        self.dtype = None

        def heads_and_dim(ch):
            if num_head_channels == -1:
                return num_heads, ch // num_heads
            return ch // num_head_channels, num_head_channels

        def transformer(ch, level, depth):
            nh, dh = heads_and_dim(ch)
            disabled_sa = disable_self_attentions[level] if disable_self_attentions is not None else False
            return SpatialTransformer(ch, nh, dh, depth=depth, dropout=dropout, context_dim=context_dim,
                                      disable_self_attn=disabled_sa, use_linear=use_linear_in_transformer)

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim))

        if num_classes is not None:
            if isinstance(num_classes, int):
                self.label_emb = nn.Embedding(num_classes, time_embed_dim)
            elif num_classes == "continuous":
                self.label_emb = nn.Linear(1, time_embed_dim)
            elif num_classes == "sequential":
                assert adm_in_channels is not None
                self.label_emb = nn.Sequential(nn.Sequential(
                    nn.Linear(adm_in_channels, time_embed_dim), nn.SiLU(),
                    nn.Linear(time_embed_dim, time_embed_dim)))
            else:
                raise ValueError(num_classes)

        self.input_blocks = nn.ModuleList([
            TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        input_block_chans = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(self.num_res_blocks[level]):
                layers = [ResBlock(ch, time_embed_dim, dropout, out_channels=mult * model_channels,
                                   use_scale_shift_norm=use_scale_shift_norm)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch, level, transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(
                    Downsample(ch, conv_resample, out_channels=ch)))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, time_embed_dim, dropout, use_scale_shift_norm=use_scale_shift_norm),
            SpatialTransformer(ch, *heads_and_dim(ch), depth=transformer_depth_middle, dropout=dropout,
                               context_dim=context_dim, disable_self_attn=disable_middle_self_attn,
                               use_linear=use_linear_in_transformer),
            ResBlock(ch, time_embed_dim, dropout, use_scale_shift_norm=use_scale_shift_norm),
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(self.num_res_blocks[level] + 1):
                ich = input_block_chans.pop()
                layers = [ResBlock(ch + ich, time_embed_dim, dropout, out_channels=model_channels * mult,
                                   use_scale_shift_norm=use_scale_shift_norm)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(transformer(ch, level, transformer_depth[level]))
                if level and i == self.num_res_blocks[level]:
                    layers.append(Upsample(ch, conv_resample, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1))

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        assert (y is not None) == (self.num_classes is not None), \
            "must specify y if and only if the model is class-conditional"
        pdtype = self.time_embed[0].weight.dtype
        t_emb = timestep_embedding(timesteps, self.model_channels).to(pdtype)
        emb = self.time_embed(t_emb)
        if self.num_classes is not None:
            assert y.shape[0] == x.shape[0]
            if y.is_floating_point():
                y = y.to(pdtype)
            emb = emb + self.label_emb(y)
        h = x.type(self.dtype or pdtype)
        if isinstance(context, torch.Tensor):
            context = context.to(h.dtype)
        elif isinstance(context, (list, tuple)):
            context = [c.to(h.dtype) if c is not None else None for c in context]
        hs = []
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = module(h, emb, context)
        h = h.type(x.dtype)
        return self.out(h)


# ----------------------------------------------------------------------------
# Text encoders
# ----------------------------------------------------------------------------

def _word_token(word: str) -> int:
    return int.from_bytes(hashlib.sha256(word.encode("utf-8")).digest()[:4], "little") % 49000


def encode_prompts(prompts: Union[str, Sequence[str]], pad_token: int = EOS_TOKEN,
                   length: int = MAX_LENGTH) -> torch.LongTensor:
    """Deterministic fake tokenizer: [bos, hash(word)%49000 ..., eos, pad...] (B, length)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    rows = []
    for p in prompts:
        ids = [_word_token(w) for w in p.split()][: length - 2]
        row = [BOS_TOKEN] + ids + [EOS_TOKEN]
        rows.append(row + [pad_token] * (length - len(row)))
    return torch.tensor(rows, dtype=torch.long)


class _CLIPTextEmbeddings(nn.Module):
    def __init__(self, hidden, vocab_size, max_positions, position_ids_buffer):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, hidden)
        self.position_embedding = nn.Embedding(max_positions, hidden)
        # transformers<=4.30 (pinned by webui) keeps position_ids in the state dict
        self.register_buffer("position_ids", torch.arange(max_positions, device="cpu").unsqueeze(0),
                             persistent=position_ids_buffer)

    def forward(self, input_ids):
        b, n = input_ids.shape
        # expanded so the Embedding, like every layer, sees the model batch in dim 0
        return self.token_embedding(input_ids) + self.position_embedding(self.position_ids[:, :n].expand(b, n))


class _CLIPAttention(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.num_heads = heads
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.q_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x):
        out = _sdpa_heads(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads, is_causal=True)
        return self.out_proj(out)


class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _CLIPMLP(nn.Module):
    def __init__(self, hidden, intermediate, act):
        super().__init__()
        self.activation_fn = _QuickGELU() if act == "quick_gelu" else nn.GELU()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)

    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x)))


class _CLIPEncoderLayer(nn.Module):
    def __init__(self, hidden, heads, intermediate, act, eps):
        super().__init__()
        self.self_attn = _CLIPAttention(hidden, heads)
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = _CLIPMLP(hidden, intermediate, act)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _CLIPEncoder(nn.Module):
    def __init__(self, hidden, layers, heads, intermediate, act, eps):
        super().__init__()
        self.layers = nn.ModuleList([_CLIPEncoderLayer(hidden, heads, intermediate, act, eps)
                                     for _ in range(layers)])


class _CLIPTextTransformer(nn.Module):
    def __init__(self, hidden, layers, heads, intermediate, vocab_size, max_positions, act, eps,
                 position_ids_buffer):
        super().__init__()
        self.embeddings = _CLIPTextEmbeddings(hidden, vocab_size, max_positions, position_ids_buffer)
        self.encoder = _CLIPEncoder(hidden, layers, heads, intermediate, act, eps)
        self.final_layer_norm = nn.LayerNorm(hidden, eps=eps)


class _CLIPTextModel(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.text_model = _CLIPTextTransformer(**kw)


class CLIPTextEncoder(nn.Module):
    """HF CLIPTextModel stand-in; keys ``transformer.text_model.*``."""

    def __init__(self, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                 vocab_size=VOCAB_SIZE, max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu",
                 layer_norm_eps=1e-5, position_ids_buffer=True):
        super().__init__()
        self.hidden_size = hidden_size
        self.transformer = _CLIPTextModel(
            hidden=hidden_size, layers=num_layers, heads=num_heads, intermediate=intermediate_size,
            vocab_size=vocab_size, max_positions=max_position_embeddings, act=hidden_act,
            eps=layer_norm_eps, position_ids_buffer=position_ids_buffer)

    def hidden_states(self, token_ids: torch.Tensor) -> List[torch.Tensor]:
        """HF ``output_hidden_states``: [embeddings, layer1, ..., layerN] (no final norm)."""
        tm = self.transformer.text_model
        x = tm.embeddings(token_ids)
        out = [x]
        for layer in tm.encoder.layers:
            x = layer(x)
            out.append(x)
        return out

    def forward(self, token_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """(B, 77) -> (B, 77, hidden). clip_skip>1: webui-style hidden_states[-clip_skip] + final norm."""
        hs = self.hidden_states(token_ids)
        return self.transformer.text_model.final_layer_norm(hs[-clip_skip])

    def encode(self, prompts: Union[str, Sequence[str]]) -> torch.LongTensor:
        return encode_prompts(prompts).to(self.transformer.text_model.embeddings.position_ids.device)


class _OpenCLIPMLP(nn.Sequential):
    def __init__(self, width, mlp_width):
        super().__init__(OrderedDict([("c_fc", nn.Linear(width, mlp_width)), ("gelu", nn.GELU()),
                                      ("c_proj", nn.Linear(mlp_width, width))]))


class _OpenCLIPResBlock(nn.Module):
    def __init__(self, width, heads, mlp_width):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ls_1 = nn.Identity()
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = _OpenCLIPMLP(width, mlp_width)
        self.ls_2 = nn.Identity()

    def forward(self, x, attn_mask):
        y = self.ln_1(x)
        x = x + self.ls_1(self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class _OpenCLIPTransformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_width):
        super().__init__()
        self.resblocks = nn.ModuleList([_OpenCLIPResBlock(width, heads, mlp_width) for _ in range(layers)])


class _OpenCLIPModel(nn.Module):
    def __init__(self, width, layers, heads, mlp_width, embed_dim, vocab_size, context_length):
        super().__init__()
        self.transformer = _OpenCLIPTransformer(width, layers, heads, mlp_width)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        mask = torch.full((context_length, context_length), float("-inf"), device="cpu").triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))


class OpenCLIPTextEncoder(nn.Module):
    """open_clip text tower stand-in (SDXL ``conditioner.embedders.1``); keys ``model.*``."""

    def __init__(self, width=1280, layers=32, heads=20, mlp_width=5120, embed_dim=1280,
                 vocab_size=VOCAB_SIZE, context_length=MAX_LENGTH):
        super().__init__()
        self.model = _OpenCLIPModel(width, layers, heads, mlp_width, embed_dim, vocab_size, context_length)

    def forward(self, token_ids: torch.Tensor):
        """Returns (penultimate hidden state (B,77,width), pooled (B,embed_dim)) like sgm's embedder 2."""
        m = self.model
        x = m.token_embedding(token_ids) + m.positional_embedding
        mask = m.attn_mask.to(x.dtype)
        penultimate = x
        for i, r in enumerate(m.transformer.resblocks):
            if i == len(m.transformer.resblocks) - 1:
                penultimate = x
            x = r(x, mask)
        o = m.ln_final(x)
        pooled = o[torch.arange(o.shape[0], device=o.device), token_ids.argmax(dim=-1)] @ m.text_projection
        return penultimate, pooled

    def encode(self, prompts):
        return encode_prompts(prompts, pad_token=0).to(self.model.token_embedding.weight.device)


# ----------------------------------------------------------------------------
# first stage stand-in and full models
# ----------------------------------------------------------------------------

class _Coder(nn.Module):
    def __init__(self, cin, ch_in, ch_out, cout):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, ch_in, 3, padding=1)
        self.conv_out = nn.Conv2d(ch_out, cout, 3, padding=1)


class FirstStageStandIn(nn.Module):
    """Not a real VAE: only the outer ldm AutoencoderKL layers (real names and shapes).

    encode: (B,3,H,W) -> (B,4,H/8,W/8);  decode: (B,4,h,w) -> (B,3,8h,8w).
    """

    def __init__(self, ch=128, ch_deep=512, z_channels=4, embed_dim=4):
        super().__init__()
        self.ch, self.ch_deep = ch, ch_deep
        self.encoder = _Coder(3, ch, ch_deep, 2 * z_channels)
        self.decoder = _Coder(z_channels, ch_deep, ch, 3)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    def encode(self, x):
        h = F.avg_pool2d(self.encoder.conv_in(x), 8)
        h = h.repeat_interleave(-(-self.ch_deep // self.ch), dim=1)[:, : self.ch_deep]
        moments = self.quant_conv(self.encoder.conv_out(F.silu(h)))
        return moments.chunk(2, dim=1)[0]

    def decode(self, z):
        h = self.decoder.conv_in(self.post_quant_conv(z))
        h = F.interpolate(h[:, : self.ch], scale_factor=8, mode="nearest")
        return self.decoder.conv_out(F.silu(h))


class _DiffusionWrapper(nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model


def _ddpm_schedule(num_timesteps=1000, linear_start=0.00085, linear_end=0.012):
    betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, num_timesteps, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    return OrderedDict([
        ("betas", betas), ("alphas_cumprod", ac), ("alphas_cumprod_prev", ac_prev),
        ("sqrt_alphas_cumprod", np.sqrt(ac)), ("sqrt_one_minus_alphas_cumprod", np.sqrt(1.0 - ac)),
        ("log_one_minus_alphas_cumprod", np.log(1.0 - ac)),
        ("sqrt_recip_alphas_cumprod", np.sqrt(1.0 / ac)),
        ("sqrt_recipm1_alphas_cumprod", np.sqrt(1.0 / ac - 1)),
        ("posterior_variance", post_var),
        ("posterior_log_variance_clipped", np.log(np.maximum(post_var, 1e-20))),
        ("posterior_mean_coef1", betas * np.sqrt(ac_prev) / (1.0 - ac)),
        ("posterior_mean_coef2", (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)),
    ])


class SD1Model(nn.Module):
    """ldm LatentDiffusion layout: ``model.diffusion_model``, ``first_stage_model``,
    ``cond_stage_model.transformer.text_model`` plus the DDPM schedule buffers."""

    def __init__(self, unet: UNetModel, cond_stage_model: Optional[CLIPTextEncoder],
                 first_stage_model: FirstStageStandIn, schedule_buffers: bool = True):
        super().__init__()
        self.model = _DiffusionWrapper(unet)
        if schedule_buffers:
            for name, arr in _ddpm_schedule().items():
                self.register_buffer(name, torch.tensor(arr, dtype=torch.float32, device="cpu"))
        self.first_stage_model = first_stage_model
        self.cond_stage_model = cond_stage_model
        self.scale_factor = 0.18215

    @property
    def diffusion_model(self) -> UNetModel:
        return self.model.diffusion_model

    def get_learned_conditioning(self, prompts: Union[str, Sequence[str]], clip_skip: int = 1):
        if self.cond_stage_model is None:
            raise RuntimeError("model was built with unet_only=True")
        return self.cond_stage_model(self.cond_stage_model.encode(prompts), clip_skip=clip_skip)

    def apply_model(self, x, t, cond):
        if isinstance(cond, dict):
            cond = cond["c_crossattn"][0] if "c_crossattn" in cond else cond["crossattn"]
        return self.model.diffusion_model(x, t, context=cond)


class _ConcatTimestepEmbedderND(nn.Module):
    def __init__(self, outdim):
        super().__init__()
        self.outdim = outdim

    def forward(self, x):
        if x.ndim == 1:
            x = x[:, None]
        b, d = x.shape
        return timestep_embedding(x.reshape(-1), self.outdim).reshape(b, d * self.outdim)


class _Conditioner(nn.Module):
    def __init__(self, embedders):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)


class SDXLModel(nn.Module):
    """sgm DiffusionEngine layout: ``model.diffusion_model``, ``conditioner.embedders.{0,1}``,
    ``first_stage_model``."""

    def __init__(self, unet: UNetModel, clip_l: CLIPTextEncoder, clip_g: OpenCLIPTextEncoder,
                 first_stage_model: FirstStageStandIn, size_embed_dim: int = 256):
        super().__init__()
        self.model = _DiffusionWrapper(unet)
        self.conditioner = _Conditioner([clip_l, clip_g] + [_ConcatTimestepEmbedderND(size_embed_dim)
                                                            for _ in range(3)])
        self.first_stage_model = first_stage_model
        self.scale_factor = 0.13025

    @property
    def diffusion_model(self) -> UNetModel:
        return self.model.diffusion_model

    def get_learned_conditioning(self, prompts, width=1024, height=1024):
        if isinstance(prompts, str):
            prompts = [prompts]
        e = self.conditioner.embedders
        l_hidden = e[0].hidden_states(e[0].encode(prompts))[-2]  # layer "hidden", layer_idx 11
        g_hidden, pooled = e[1](e[1].encode(prompts))
        b = len(prompts)
        dev = pooled.device
        sizes = [torch.tensor([[height, width]] * b, device=dev),
                 torch.tensor([[0, 0]] * b, device=dev),
                 torch.tensor([[height, width]] * b, device=dev)]
        vec = [pooled] + [emb(s).to(pooled.dtype) for emb, s in zip(e[2:], sizes)]
        return {"crossattn": torch.cat([l_hidden, g_hidden.to(l_hidden.dtype)], dim=2),
                "vector": torch.cat(vec, dim=1)}

    def apply_model(self, x, t, cond):
        return self.model.diffusion_model(x, t, context=cond["crossattn"], y=cond["vector"])


# ----------------------------------------------------------------------------
# configs, initialisation and factories
# ----------------------------------------------------------------------------

def sd1_unet_config(size: str = "tiny", inpainting: bool = False) -> dict:
    if size == "tiny":
        cfg = dict(model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(2, 1),
                   num_res_blocks=2, num_heads=2, context_dim=32, transformer_depth=1)
    elif size in ("sd15", "sd1", "full"):
        cfg = dict(model_channels=320, channel_mult=(1, 2, 4, 4), attention_resolutions=(4, 2, 1),
                   num_res_blocks=2, num_heads=8, context_dim=768, transformer_depth=1)
    else:
        raise ValueError(size)
    cfg.update(in_channels=9 if inpainting else 4, out_channels=4)
    return cfg


def sdxl_unet_config(size: str = "sdxl") -> dict:
    if size == "tiny":
        cfg = dict(model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(4, 2),
                   transformer_depth=(1, 1, 2), num_head_channels=16, context_dim=64,
                   adm_in_channels=32 + 6 * 16)
    elif size in ("sdxl", "full"):
        cfg = dict(model_channels=320, channel_mult=(1, 2, 4), attention_resolutions=(4, 2),
                   transformer_depth=(1, 2, 10), num_head_channels=64, context_dim=2048,
                   adm_in_channels=2816)
    else:
        raise ValueError(size)
    cfg.update(in_channels=4, out_channels=4, num_res_blocks=2, num_classes="sequential",
               use_linear_in_transformer=True)
    return cfg


_NORM_TYPES = (nn.GroupNorm, nn.LayerNorm)


@torch.no_grad()
def init_random_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic random init of every parameter (in named_parameters order).

    Weights ~ N(0, 1/fan_in), biases ~ N(0, 0.02^2), norm weights ~ 1 + N(0, 0.05^2),
    embeddings ~ N(0, 0.02^2) (token) / N(0, 0.01^2) (position). Numbers are drawn
    in float32 with a generator on the parameter's device (CPU and CUDA therefore
    give different, but each reproducible, weights) and cast to the parameter dtype.
    """
    owner = {}
    for mname, m in module.named_modules():
        for pname, _ in m.named_parameters(recurse=False):
            owner[f"{mname}.{pname}" if mname else pname] = m
    gens = {}
    for name, p in module.named_parameters():
        if p.device.type == "meta":
            continue
        g = gens.get(p.device)
        if g is None:
            g = gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        m = owner.get(name)
        leaf = name.rsplit(".", 1)[-1]
        t = torch.empty(p.shape, dtype=torch.float32, device=p.device)
        if leaf == "logit_scale":
            t.fill_(math.log(1 / 0.07))
        elif isinstance(m, _NORM_TYPES):
            t.normal_(0.0, 0.05, generator=g)
            if leaf == "weight":
                t += 1.0
        elif isinstance(m, nn.Embedding) or leaf == "positional_embedding":
            t.normal_(0.0, 0.01 if ("position" in name) else 0.02, generator=g)
        elif p.dim() >= 2:
            fan_in = p[0].numel()
            if leaf == "in_proj_weight":
                fan_in = p.shape[1]
            t.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=g)
        else:
            t.normal_(0.0, 0.02, generator=g)
        p.copy_(t)
    return module


def _materialise(build, seed, device, dtype):
    """Build with parameters on meta (buffers are created on CPU explicitly), then allocate
    every parameter directly on ``device`` in ``dtype`` and random-init it."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    with torch.device("meta"):
        module = build()
    for m in module.modules():
        for n, p in list(m._parameters.items()):
            if p is None:
                continue
            m._parameters[n] = nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device),
                                            requires_grad=p.requires_grad)
        for n, b in list(m._buffers.items()):
            if b is None:
                continue
            b = b.to(device) if device.type != "meta" else torch.empty_like(b, device="meta")
            m._buffers[n] = b.to(dtype) if b.is_floating_point() else b
    if device.type == "meta":
        return module
    return init_random_(module, seed)


def make_sd1(size: str = "tiny", seed: int = 0, inpainting: bool = False, dtype=torch.float32,
             device=None, unet_only: bool = False) -> SD1Model:
    """SD1 LatentDiffusion stand-in. size: "tiny" or "sd15". device="meta" gives shapes only."""
    ucfg = sd1_unet_config(size, inpainting)
    full = size != "tiny"

    def build():
        unet = UNetModel(**ucfg)
        clip = None
        if not unet_only:
            clip = (CLIPTextEncoder(768, 12, 12, 3072) if full else
                    CLIPTextEncoder(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64))
        vae = FirstStageStandIn(128, 512) if full else FirstStageStandIn(32, 64)
        return SD1Model(unet, clip, vae)

    return _materialise(build, seed, device, dtype)


def make_sdxl(size: str = "tiny", seed: int = 0, dtype=torch.float32, device=None) -> SDXLModel:
    """SDXL DiffusionEngine stand-in (size "tiny" or "sdxl")."""
    ucfg = sdxl_unet_config(size)
    full = size != "tiny"

    def build():
        unet = UNetModel(**ucfg)
        if full:
            clip_l = CLIPTextEncoder(768, 12, 12, 3072)
            clip_g = OpenCLIPTextEncoder(1280, 32, 20, 5120, 1280)
            vae = FirstStageStandIn(128, 512)
        else:
            clip_l = CLIPTextEncoder(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
            clip_g = OpenCLIPTextEncoder(width=32, layers=2, heads=2, mlp_width=64, embed_dim=32)
            vae = FirstStageStandIn(32, 64)
        return SDXLModel(unet, clip_l, clip_g, vae, size_embed_dim=256 if full else 16)

    return _materialise(build, seed, device, dtype)


def make_sdxl_unet(size: str = "sdxl", seed: int = 0, device=None, dtype=torch.float32) -> UNetModel:
    """Real SDXL UNet config (~2.57G params) built on meta and allocated directly on
    ``device`` in ``dtype`` (e.g. device="cuda", dtype=torch.float16)."""
    ucfg = sdxl_unet_config(size)
    return _materialise(lambda: UNetModel(**ucfg), seed, device, dtype)


def make_sdxl_like_state_dict(size: str = "tiny", seed: int = 0, dtype=torch.float32,
                              device=None) -> Dict[str, torch.Tensor]:
    """State dict with the SDXL checkpoint key layout (model.diffusion_model.*,
    conditioner.embedders.0.transformer.text_model.*, conditioner.embedders.1.model.*,
    first_stage_model.*)."""
    return dict(make_sdxl(size, seed, dtype=dtype, device=device).state_dict())


# ----------------------------------------------------------------------------
# checksums and checkpoints
# ----------------------------------------------------------------------------

def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes()


def state_dict_checksum(module_or_sd: Union[nn.Module, Dict[str, torch.Tensor]]) -> str:
    """sha256 over every parameter and buffer (incl. non-persistent ones): name, dtype, shape, bytes,
    in sorted-name order."""
    if isinstance(module_or_sd, nn.Module):
        items = dict(module_or_sd.named_parameters(remove_duplicate=False))
        items.update(module_or_sd.named_buffers(remove_duplicate=False))
    else:
        items = dict(module_or_sd)
    h = hashlib.sha256()
    for name in sorted(items):
        t = items[name]
        h.update(name.encode("utf-8") + b"\0")
        h.update(str(t.dtype).encode() + b"\0" + repr(tuple(t.shape)).encode() + b"\0")
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def save_checkpoint(state_dict: Dict[str, torch.Tensor], path: Union[str, os.PathLike],
                    metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a safetensors file; identical tensors give byte-identical files (keys sorted,
    tensors moved to CPU, made contiguous, shared storage cloned)."""
    from safetensors.torch import save_file

    out = {}
    seen = set()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu")
        ptr = t.untyped_storage().data_ptr()
        if (not t.is_contiguous() or ptr in seen
                or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    save_file(out, os.fspath(path), metadata=metadata)
