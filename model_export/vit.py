"""The project's own Vision Transformer, written to be read (Dosovitskiy et al. 2020, arXiv:2010.11929).

An image is cut into square patches; each patch is flattened and linearly projected to a `dim`-wide token
(`PatchEmbedding`). A learned class token is put in front and a learned position embedding is added, so the
model knows where each patch came from. A stack of pre-norm transformer `Block`s mixes the tokens: LayerNorm,
multi-head self-attention (softmax over scaled dot products), residual add; LayerNorm, feed-forward MLP,
residual add. The class token's final state, normalised, goes through a linear head to class logits.

Every `Attention` keeps its softmax probabilities explicit (no fused kernel), so the ONNX export can return
them and the service can draw attention maps without PyTorch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from vit_artifact.metadata import Preprocessing


@dataclass(frozen=True)
class ViTConfig:
    """Defaults: the committed default model (models/digits-vit), 142k parameters."""

    image_size: int = 32  # the default model's canvas; digits are placed at random inside it
    patch_size: int = 4  # 32 / 4 = an 8x8 grid of patches: fine enough to locate a digit
    in_channels: int = 3  # RGB, like every photo model; grey images are replicated to three channels
    num_classes: int = 10  # the digits 0-9
    dim: int = 64  # token width: enough for ten classes of 8x8-pixel strokes, small enough to train in minutes
    depth: int = 4  # transformer blocks: rollout over four layers still points at the digit
    heads: int = 4  # attention heads per block; dim must divide evenly (16 dimensions each)
    mlp_ratio: float = 2.0  # feed-forward hidden width = mlp_ratio * dim
    dropout: float = 0.0  # the canvases are re-drawn every epoch: augmentation enough

    def __post_init__(self) -> None:
        assert self.image_size % self.patch_size == 0, "image size must be divisible by patch size"
        assert self.dim % self.heads == 0, "dim must be divisible by the number of heads"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class PatchEmbedding(nn.Module):
    """Cut the image into patches and project each to a token: a strided convolution is exactly that."""

    def __init__(self, *, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)  # (B, dim, grid, grid)
        return x.flatten(2).transpose(1, 2)  # (B, grid*grid, dim), row-major patch order


class Attention(nn.Module):
    """Multi-head self-attention: every token looks at every token, with `heads` independent views."""

    def __init__(self, *, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5  # keeps dot products at unit variance before the softmax
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads)  # (B, N, 3, heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        scores = (q * self.scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
        probs = scores.softmax(dim=-1)  # each row sums to 1: how much a token takes from every other
        out = self.drop(probs) @ v  # (B, heads, N, head_dim)
        out = out.transpose(1, 2).reshape(b, n, d)  # heads concatenated back to (B, N, dim)
        return self.proj(out), probs


class FeedForward(nn.Module):
    """Per-token MLP: widen, GELU, narrow. Where most of a transformer's parameters live."""

    def __init__(self, *, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Block(nn.Module):
    """Pre-norm transformer block: two residual lines, attention then feed-forward."""

    def __init__(self, *, dim: int, heads: int, mlp_hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim=dim, heads=heads, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim=dim, hidden=mlp_hidden, dropout=dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        attended, probs = self.attn(self.norm1(x))
        x = x + attended  # residual connection: the block adds to the token, never replaces it
        x = x + self.mlp(self.norm2(x))
        return x, probs


class VisionTransformer(nn.Module):
    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.patch_embed = PatchEmbedding(patch_size=c.patch_size, in_channels=c.in_channels, dim=c.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + c.num_patches, c.dim) * 0.02)
        mlp_hidden = int(c.dim * c.mlp_ratio)
        self.blocks = nn.ModuleList(
            Block(dim=c.dim, heads=c.heads, mlp_hidden=mlp_hidden, dropout=c.dropout) for _ in range(c.depth)
        )
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.num_classes)
        self.apply(_init_weights)

    def forward_features(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens after the last block, and every block's attention probabilities (B, L, heads, N, N)."""
        tokens, attentions = self._features(pixels)
        return tokens, torch.stack(attentions, dim=1)

    def _features(self, pixels: Tensor) -> tuple[Tensor, list[Tensor]]:
        x = self.patch_embed(pixels)  # (B, P, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, dim)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1 + P, dim)
        attentions = []
        for block in self.blocks:
            x, probs = block(x)
            attentions.append(probs)  # (B, heads, N, N)
        return self.norm(x), attentions

    def forward_head(self, tokens: Tensor) -> Tensor:
        return self.head(tokens[:, 0])  # (B, classes): the class token summarises the image

    def forward(self, pixels: Tensor) -> Tensor:
        tokens, _ = self.forward_features(pixels)
        return self.forward_head(tokens)

    def forward_with_attention(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        tokens, attentions = self.forward_features(pixels)
        return self.forward_head(tokens), attentions

    def forward_blocks(self, pixels: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Logits and each block's own probabilities tensor, the one multiplied with the values: a gradient
        with respect to it is a gradient with respect to that block's attention (relevance maps)."""
        tokens, attentions = self._features(pixels)
        return self.forward_head(tokens), attentions


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def save_checkpoint(
    model: VisionTransformer,
    path: str,
    *,
    labels: list[str],
    preprocessing: Preprocessing,
    extra: dict | None = None,
) -> None:
    """A checkpoint carries its config, labels and preprocessing, so `model_export own` needs nothing else."""
    assert len(labels) == model.config.num_classes, "one label per class"
    torch.save(
        {
            "format": "vitserve-vit",
            "config": model.config.to_dict(),
            "labels": labels,
            "preprocessing": preprocessing.model_dump(mode="json"),
            "state_dict": model.state_dict(),
            **(extra or {}),
        },
        path,
    )
