"""Regenerate every figure and table of docs/vit.md and the README pictures (`make docs`), offline.

Figures come from the committed default model through the same code the service runs (onnxruntime, the
attention-map module, the service's own routes for the overlays); tables come from `model_export.complexity`.

    PYTHONPATH=. python docs/make_docs.py            # everything, in place
    PYTHONPATH=. python docs/make_docs.py --quick --out /tmp/docs   # fewer timing points (used by the tests)
"""

from __future__ import annotations

import argparse
import io
import json
import re
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import onnxruntime as ort
from PIL import Image

from model_export.complexity import STANDARD, count, crossover_tokens
from model_export.digits import held_out_set
from model_export.train import DIGITS_CONFIG
from model_export.vit import ViTConfig
from vit_artifact.attention import per_layer_cls_maps, rollout
from vit_artifact.metadata import read_metadata

DOCS = Path(__file__).parent
ROOT = DOCS.parent
MODEL = ROOT / "models" / "digits-vit"
EXAMPLE = 11  # a held-out canvas (a "4"), used by every figure
COMPLEXITY_CONFIG = ViTConfig(image_size=32, patch_size=8, num_classes=10, dim=64, depth=4, heads=4, mlp_ratio=4)


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def fmt_count(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return str(int(value))


def hyperparameter_table() -> str:
    rows = [
        "| model | patch | width | depth | heads | MLP | parameters | GFLOPs / image | attention share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    configs = {**STANDARD, "digits-vit (default model, 32x32)": DIGITS_CONFIG}
    for name, c in configs.items():
        cost = count(c)
        rows.append(
            f"| {name} | {c.patch_size} | {c.dim} | {c.depth} | {c.heads} | {int(c.dim * c.mlp_ratio)} | "
            f"{cost.params:,} ({fmt_count(cost.params)}) | {cost.flops / 1e9:.3f} | "
            f"{cost.attention_flops / cost.flops:.1%} |"
        )
    return "\n".join(rows)


def patch_figure(out: Path, image: np.ndarray, grid: tuple[int, int]) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    size = image.shape[0]
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=255)
    axes[0].set_title("input 32x32")
    axes[1].imshow(image, cmap="gray", vmin=0, vmax=255)
    step = size / grid[1]
    for k in range(1, grid[0]):
        axes[1].axhline(k * step - 0.5, color="tab:orange", lw=0.8)
        axes[1].axvline(k * step - 0.5, color="tab:orange", lw=0.8)
    for r in range(grid[0]):
        for c in range(grid[1]):
            axes[1].text(
                c * step + step / 2 - 0.5,
                r * step + step / 2 - 0.5,
                str(1 + r * grid[1] + c),
                color="white",
                ha="center",
                va="center",
                fontsize=6,
            )
    axes[1].set_title(f"{grid[0]}x{grid[1]} patches = tokens 1-{grid[0] * grid[1]} (token 0: class)")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def position_figure(out: Path) -> None:
    """Cosine similarity of each patch's learned position embedding with all others (from the checkpoint's
    ONNX graph: the embedding is a constant there)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(MODEL / "attention.onnx"))
    pos = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name.endswith("pos_embed"))
    pos = pos[0, 1:]  # (P, dim), patches only
    unit = pos / np.linalg.norm(pos, axis=1, keepdims=True)
    sim = unit @ unit.T  # (P, P)
    g = int(np.sqrt(len(pos)))
    fig, axes = plt.subplots(g, g, figsize=(6, 6))
    for i, ax in enumerate(axes.flat):
        ax.imshow(sim[i].reshape(g, g), cmap="viridis", vmin=-1, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        "learned position embeddings: each small map is one patch's\nsimilarity to every other patch", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def attention_figure(out: Path, image: np.ndarray, label: int) -> None:
    meta = read_metadata(MODEL)
    from vit_artifact.preprocessing import preprocess

    x = preprocess(Image.fromarray(image).convert("RGB"), meta.preprocessing)[None]
    sess = ort.InferenceSession(str(MODEL / "attention.onnx"), providers=["CPUExecutionProvider"])
    logits, attentions = sess.run(None, {"pixel_values": x})
    maps = per_layer_cls_maps(attentions[0], num_prefix_tokens=meta.num_prefix_tokens, grid=meta.grid)
    roll = rollout(attentions[0], num_prefix_tokens=meta.num_prefix_tokens, grid=meta.grid)
    layers, heads = maps.shape[:2]
    fig, axes = plt.subplots(layers, heads + 2, figsize=(1.6 * (heads + 2), 1.6 * layers))
    for layer in range(layers):
        axes[layer, 0].imshow(image, cmap="gray")
        axes[layer, 0].set_ylabel(f"layer {layer}")
        for head in range(heads):
            axes[layer, head + 1].imshow(maps[layer, head], cmap="inferno", vmin=0, vmax=1)
            if layer == 0:
                axes[layer, head + 1].set_title(f"head {head}", fontsize=9)
        if layer == layers - 1:
            axes[layer, -1].imshow(roll, cmap="inferno", vmin=0, vmax=1)
            axes[layer, -1].set_title("rollout", fontsize=9)
        else:
            axes[layer, -1].axis("off")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"class-token attention per layer and head; label {label}, predicted {int(logits[0].argmax())}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def relevance_figure(out: Path, image: np.ndarray, label: int) -> list[int]:
    """One canvas: rollout beside the relevance maps of its top two classes (the relevance graph's raw maps,
    stretched to [0, 1] as served). Returns the two classes."""
    from vit_artifact.attention import normalize_map
    from vit_artifact.preprocessing import preprocess

    meta = read_metadata(MODEL)
    x = preprocess(Image.fromarray(image).convert("RGB"), meta.preprocessing)[None]
    attention = ort.InferenceSession(str(MODEL / "attention.onnx"), providers=["CPUExecutionProvider"])
    logits, attentions = attention.run(None, {"pixel_values": x})
    roll = rollout(attentions[0], num_prefix_tokens=meta.num_prefix_tokens, grid=meta.grid)
    relevance = ort.InferenceSession(str(MODEL / "relevance.onnx"), providers=["CPUExecutionProvider"])
    probs = np.exp(logits[0] - logits[0].max())
    probs /= probs.sum()
    classes = [int(c) for c in np.argsort(-logits[0])[:2]]
    panels = [("canvas", image, "gray"), ("rollout (any class)", roll, "inferno")]
    for rank, c in zip(("top-1", "top-2"), classes, strict=True):
        (raw,) = relevance.run(["relevance"], {"pixel_values": x, "target": np.array([c], np.int64)})
        panels.append((f"relevance, {rank}: {c} ({probs[c]:.0%})", normalize_map(raw[0]), "inferno"))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.9))
    for ax, (title, values, cmap) in zip(axes, panels, strict=True):
        ax.imshow(values, cmap=cmap, vmin=0 if cmap == "inferno" else None, vmax=1 if cmap == "inferno" else None)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"held-out canvas, label {label}: rollout and class-specific relevance (Chefer et al.)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return classes


def overlays(out_dir: Path, held, relevance_classes: list[int]) -> None:  # type: ignore[no-untyped-def]
    """README pictures, produced by the service's own routes."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    with TestClient(create_app()) as client:
        for i, name, query in [
            (3, "digit-rollout", ""),
            (EXAMPLE, "digit-rollout-2", ""),
            (3, "digit-layer0-head1", "&method=layer&layer=0&head=1"),
            *[
                (EXAMPLE, f"digit-relevance-top{rank}", f"&method=relevance&target={c}")
                for rank, c in enumerate(relevance_classes, start=1)
            ],
        ]:
            r = client.post(
                f"/v1/attention?format=png{query}", content=png(held.images[i]), headers={"content-type": "image/png"}
            )
            r.raise_for_status()
            (out_dir / f"{name}.png").write_bytes(r.content)


def measure_complexity(out: Path, *, sizes: list[int], repeats: int) -> dict:
    """onnxruntime latency of one ViT configuration as the token count grows; fit t = a + b N + c N²."""
    import torch

    from model_export.vit import VisionTransformer

    tokens, latency = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            config = ViTConfig(**{**COMPLEXITY_CONFIG.to_dict(), "image_size": size})
            path = Path(tmp) / f"vit{size}.onnx"
            model = VisionTransformer(config).eval()
            with torch.no_grad():
                torch.onnx.export(
                    model,
                    (torch.zeros(1, 3, size, size),),
                    str(path),
                    input_names=["x"],
                    output_names=["logits"],
                    opset_version=17,
                    dynamo=False,
                )
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1  # one core: the curve, not the thread scheduling, is measured
            sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            x = np.zeros((1, 3, size, size), np.float32)
            sess.run(None, {"x": x})
            runs = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                sess.run(None, {"x": x})
                runs.append(time.perf_counter() - t0)
            tokens.append(1 + (size // config.patch_size) ** 2)
            latency.append(min(runs) * 1e3)  # the least-disturbed run: robust to other load on the machine
    n = np.array(tokens, float)
    t = np.array(latency)
    # Non-negative least squares, each point weighted by 1/t so the small images count as much as the large.
    from scipy.optimize import nnls

    design = np.stack([np.ones_like(n), n, n * n], 1) / t[:, None]
    a, b, c = nnls(design, np.ones_like(t))[0]
    measured_crossover = b / c if c > 0 and b > 0 else float("nan")  # a noisy run can fit no crossover
    predicted = crossover_tokens(COMPLEXITY_CONFIG)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(n, t, "o", label="measured (best of repeats)")
    grid = np.linspace(n.min(), n.max(), 200)
    ax.plot(grid, a + b * grid + c * grid * grid, "-", label=f"fit: {a:.2f} + {b:.2e}·N + {c:.2e}·N² ms")
    ax.plot(grid, a + b * grid, "--", label="linear part (projections, MLP)")
    ax.plot(grid, c * grid * grid, ":", label="quadratic part (attention)")
    ax.axvline(measured_crossover, color="gray", lw=0.8)
    ax.set_xlabel("tokens N (1 + patches)")
    ax.set_ylabel("latency, ms (1 image, 1 thread)")
    ax.set_title(
        f"width {COMPLEXITY_CONFIG.dim}, depth {COMPLEXITY_CONFIG.depth}, patch {COMPLEXITY_CONFIG.patch_size}: "
        f"attention overtakes at N≈{measured_crossover:.0f} (FLOPs say {predicted:.0f})"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return {
        "tokens": tokens,
        "latency_ms": [round(v, 3) for v in latency],
        "fit_ms": [a, b, c],
        "measured_crossover_tokens": round(float(measured_crossover), 1),
        "flops_crossover_tokens": predicted,
    }


def fill(markdown: str, key: str, body: str) -> str:
    """Replace the text between `<!-- key -->` and `<!-- /key -->`."""
    pattern = re.compile(rf"(<!-- {key} -->\n).*?(<!-- /{key} -->)", re.S)
    if not pattern.search(markdown):
        raise ValueError(f"docs/vit.md has no <!-- {key} --> block")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DOCS, help="where vit.md and images/ are written")
    parser.add_argument("--quick", action="store_true", help="fewer timing points and repeats")
    args = parser.parse_args()
    images = args.out / "images"
    images.mkdir(parents=True, exist_ok=True)
    held = held_out_set()
    example, label = held.images[EXAMPLE], int(held.labels[EXAMPLE])
    patch_figure(images / "patches.png", example, (DIGITS_CONFIG.grid, DIGITS_CONFIG.grid))
    position_figure(images / "position-embeddings.png")
    attention_figure(images / "attention-layers.png", example, label)
    classes = relevance_figure(images / "relevance.png", example, label)
    overlays(images, held, classes)
    sizes = [32, 96, 160, 256] if args.quick else [32, 64, 96, 128, 160, 192, 224, 256, 288, 320]
    complexity = measure_complexity(images / "complexity.png", sizes=sizes, repeats=3 if args.quick else 15)
    (images / "complexity.json").write_text(json.dumps(complexity, indent=2) + "\n")
    text = (DOCS / "vit.md").read_text()
    text = fill(text, "hyperparameters", hyperparameter_table())
    c = complexity
    text = fill(
        text,
        "complexity",
        (
            f"Measured: t(N) = {c['fit_ms'][0]:.3f} + {c['fit_ms'][1]:.3e}·N + {c['fit_ms'][2]:.3e}·N² ms; the "
            f"quadratic term overtakes the linear one at **N ≈ {c['measured_crossover_tokens']:.0f} tokens** "
            f"(FLOP count: {c['flops_crossover_tokens']:.0f})."
        ),
    )
    (args.out / "vit.md").write_text(text)
    print(
        f"wrote {args.out / 'vit.md'} and {len(list(images.glob('*.png')))} figures; complexity: "
        f"crossover {c['measured_crossover_tokens']} tokens measured, {c['flops_crossover_tokens']} by FLOPs"
    )


if __name__ == "__main__":
    main()
