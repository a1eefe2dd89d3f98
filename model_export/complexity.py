"""Parameters and FLOPs of a ViT, counted from its configuration (not copied from papers).

FLOPs count a multiply-add as 2 operations, for one image at the configured size, inference only. The split
matters for the complexity argument: `linear` grows with the number of tokens N (every token goes through the
same projections and MLP), `attention` (Q·Kᵀ and the weighted sum of V) grows with N².
"""

from __future__ import annotations

from dataclasses import dataclass

from .vit import ViTConfig

# The standard sizes of Dosovitskiy et al. (2020), Table 1, and DeiT's Tiny/Small (Touvron et al. 2021),
# all at 224x224 with 16x16 patches and an MLP 4x the width.
STANDARD = {
    "ViT-Ti/16": ViTConfig(image_size=224, patch_size=16, num_classes=1000, dim=192, depth=12, heads=3, mlp_ratio=4),
    "ViT-S/16": ViTConfig(image_size=224, patch_size=16, num_classes=1000, dim=384, depth=12, heads=6, mlp_ratio=4),
    "ViT-B/16": ViTConfig(image_size=224, patch_size=16, num_classes=1000, dim=768, depth=12, heads=12, mlp_ratio=4),
    "ViT-L/16": ViTConfig(image_size=224, patch_size=16, num_classes=1000, dim=1024, depth=24, heads=16, mlp_ratio=4),
}


@dataclass(frozen=True)
class Cost:
    params: int
    linear_flops: int  # patch embedding, QKV, output projection, MLP, head: O(N)
    attention_flops: int  # scores Q·Kᵀ and probabilities·V: O(N²)
    other_flops: int  # softmax, LayerNorm, GELU, residual adds: O(N), small

    @property
    def flops(self) -> int:
        return self.linear_flops + self.attention_flops + self.other_flops


def count(config: ViTConfig, *, image_size: int | None = None) -> Cost:
    """Parameters and per-image FLOPs; `image_size` evaluates the same weights at another resolution."""
    c = config
    size = image_size or c.image_size
    n = 1 + (size // c.patch_size) ** 2  # tokens: class token + patches
    d, hidden, depth = c.dim, int(c.dim * c.mlp_ratio), c.depth
    patch_in = c.in_channels * c.patch_size**2

    params = (
        patch_in * d
        + d  # patch embedding (a linear map of each flattened patch)
        + d  # class token
        + (1 + c.num_patches) * d  # position embeddings (stored at the trained size)
        + depth
        * (
            2 * 2 * d  # two LayerNorms
            + 3 * d * d
            + 3 * d  # QKV projection
            + d * d
            + d  # attention output projection
            + d * hidden
            + hidden
            + hidden * d
            + d  # MLP
        )
        + 2 * d  # final LayerNorm
        + d * c.num_classes
        + c.num_classes  # head
    )
    patches = n - 1
    linear = 2 * patches * patch_in * d + depth * 2 * n * (3 * d * d + d * d + 2 * d * hidden) + 2 * d * c.num_classes
    attention = depth * 2 * (2 * n * n * d)  # Q·Kᵀ (N x N x d) and P·V (N x N x d), over all heads
    other = depth * (c.heads * n * n * 5 + n * hidden * 8 + 2 * n * d * 5 + 2 * n * d)  # rough, small
    return Cost(params=params, linear_flops=linear, attention_flops=attention, other_flops=other)


def crossover_tokens(config: ViTConfig) -> float:
    """Token count where attention FLOPs equal the linear layers' per block: 4N²d = 2N(4d² + 2d·hidden)."""
    d, hidden = config.dim, config.dim * config.mlp_ratio
    return (4 * d * d + 2 * d * hidden) / (2 * d)
