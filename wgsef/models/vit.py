"""A small Vision Transformer for 8-32 px inputs (timm's layout, as in Gaudi-GBLR's CIFAR experiments).

Patch embedding (a conv of kernel = stride = patch_size), a class token and learned position embeddings,
`depth` pre-norm blocks (LayerNorm -> multi-head self-attention -> residual, LayerNorm -> MLP with GELU
-> residual), a final LayerNorm and a linear head on the class token. The defaults are the official
Gaudi-GBLR CIFAR ViT-S (changwoolee/Gaudi-GBLR, src/models/vit/vit.py `vit_small_patch4_32`: patch 4,
width 768, depth 8, 8 heads, MLP ratio 4, qkv bias, LayerNorm eps 1e-6; trunc-normal(0.02) weights, zero
biases, zero-initialised head; drop_path_rate 0.1 in configs/experiment/cifar10/vit/vit-s.yaml).
`width` scales the embedding width (rounded to a multiple of the head count) like the registry's CNNs.

Each attention has a fused `qkv` Linear (q, k, v, each `heads` x `head_dim`) and an output `proj`: the
layout wgsef.groups.head groups by head and wgsef.compress removes heads from. The number of heads is
read from the qkv output width (`num_heads` = qkv outputs / (3 head_dim)), so a compacted model saved by
save_compact rebuilds with its own head count (and GBLR's layers can stand in for qkv); the attention
scale stays head_dim ** -0.5.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, qkv_bias: bool = True):
        super().__init__()
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(heads * head_dim, dim)

    @property
    def num_heads(self) -> int:
        return self.qkv.out_features // (3 * self.head_dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, -1, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * self.head_dim ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch per sample with probability p in training (timm)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1 - self.p)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, hidden: int, qkv_bias: bool, drop_path: float):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads, head_dim, qkv_bias)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, hidden)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, patch_size: int = 4,
                 dim: int = 768, depth: int = 8, heads: int = 8, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, width: float = 1.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"vit: image_size {image_size} is not a multiple of patch_size {patch_size}")
        if dim % heads:
            raise ValueError(f"vit: dim {dim} is not a multiple of heads {heads}")
        dim = max(heads, round(dim * width / heads) * heads)  # `width` scales the embedding, heads stay
        if not 0 <= drop_path < 1:
            raise ValueError(f"vit: drop_path must lie in [0, 1), got {drop_path}")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        tokens = (image_size // patch_size) ** 2 + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        rates = torch.linspace(0, drop_path, depth).tolist()  # stochastic depth grows with depth (timm)
        self.blocks = nn.Sequential(*[Block(dim, heads, dim // heads, round(dim * mlp_ratio), qkv_bias, r)
                                      for r in rates])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        self._init()

    def _init(self) -> None:
        """timm's ViT init as in the official code: trunc-normal(0.02) linear weights and tokens, zero
        biases, LayerNorm (1, 0), zero head; the patch conv keeps PyTorch's default."""
        for t in (self.pos_embed, self.cls_token):
            nn.init.trunc_normal_(t, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.weight) if name == "head" else nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias) if m.bias is not None else None
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])
