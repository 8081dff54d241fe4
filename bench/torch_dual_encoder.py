"""The peer for bench/train_throughput.py and bench/accelerator.py: jaxmr's dual encoder written plainly in
PyTorch (eager fp32 on a CPU; bf16 autocast and torch.compile on a GPU are the caller's choice).

Same blocks as jaxmr.models (pre-LN Transformer, ViT with patch conv and LN before the blocks, text tower with
padding mask and EOS / mean / CLS pooling, bias-free projections, learnable logit scale), so the two sides do
the same arithmetic.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from jaxmr.models import ModelConfig


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _activation(name: str) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, activation: str):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), _activation(activation), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, padding: torch.Tensor | None = None):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=attn_mask, key_padding_mask=padding, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.patchify = nn.Conv2d(3, c.width, c.patch, c.patch, bias=False)
        tokens = (c.image_size // c.patch) ** 2 + (c.pool == "cls")
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, c.width))
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, c.width)) if c.pool == "cls" else None
        self.ln_pre = nn.LayerNorm(c.width) if c.ln_pre else nn.Identity()
        self.blocks = nn.ModuleList([Block(c.width, c.heads, c.mlp_ratio, c.activation) for _ in range(c.depth)])
        self.ln_post = nn.LayerNorm(c.width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patchify(images).flatten(2).transpose(1, 2)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.ln_pre(x + self.pos)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x[:, 0] if self.cls is not None else x.mean(1))


class TextTransformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c.vocab_size, c.width)
        self.pos = nn.Parameter(0.01 * torch.randn(1, c.max_len, c.width))
        self.blocks = nn.ModuleList([Block(c.width, c.heads, c.mlp_ratio, c.activation) for _ in range(c.depth)])
        self.ln_final = nn.LayerNorm(c.width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        padding = tokens == self.c.pad_id
        causal = (
            torch.triu(torch.ones(length, length, dtype=torch.bool, device=tokens.device), 1) if self.c.causal else None
        )
        x = self.embed(tokens) + self.pos[:, :length]
        for block in self.blocks:
            x = block(x, attn_mask=causal, padding=padding)
        x = self.ln_final(x)
        valid = (~padding).float()
        if self.c.pool == "mean":
            return (x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
        if self.c.pool == "cls":
            return x[:, 0]
        last = (valid.sum(1).long() - 1).clamp(min=0)
        return x[torch.arange(x.shape[0], device=x.device), last]


class TorchDualEncoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.image = ViT(config.image)
        self.text = TextTransformer(config.text)
        self.image_proj = nn.Linear(config.image.width, config.embed_dim, bias=False)
        self.text_proj = nn.Linear(config.text.width, config.embed_dim, bias=False)
        self.log_scale = nn.Parameter(torch.tensor(math.log(config.init_logit_scale)))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        zimg = F.normalize(self.image_proj(self.image(images)), dim=-1)
        ztxt = F.normalize(self.text_proj(self.text(tokens)), dim=-1)
        return zimg, ztxt, self.log_scale.exp().clamp(max=100)


def clip_loss(zimg: torch.Tensor, ztxt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    logits = scale * zimg @ ztxt.T
    labels = torch.arange(len(zimg), device=zimg.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
