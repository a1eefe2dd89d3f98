"""The compute ceiling: what this machine's matrix multiply does per second, and what a ViT asks of it per image.

    PYTHONPATH=. python benchmarks/roofline.py

A ViT's time goes into matrix multiplies, so the images/s no runtime can beat is roughly
GEMM FLOP/s / FLOPs per image. SGEMM is measured with numpy (OpenBLAS) and with onnxruntime's MatMul (MLAS, what
serving runs) on 2048x2048 matrices, the best of a few runs each, and the larger taken; the INT8 GEMM
(onnxruntime MatMulInteger, u8 x s8, VNNI where the CPU has it) gives the ceiling the INT8 variants work under.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ViTShape:
    image_size: int
    patch_size: int
    dim: int
    depth: int
    heads: int
    mlp_dim: int
    num_classes: int
    prefix_tokens: int = 1  # the class token

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + self.prefix_tokens


def vit_flops(s: ViTShape) -> dict[str, float]:
    """FLOPs (2 per multiply-add) of one image's forward pass, by part; LayerNorm, softmax and GELU left out."""
    n, d = s.tokens, s.dim
    patches = (s.image_size // s.patch_size) ** 2
    parts = {
        "patch_embedding": 2 * patches * (3 * s.patch_size**2) * d,
        "qkv": s.depth * 2 * n * d * 3 * d,
        "attention_scores": s.depth * 2 * n * n * d,  # Q K^T over all heads: heads * n * n * (d / heads)
        "attention_values": s.depth * 2 * n * n * d,  # P V
        "projection": s.depth * 2 * n * d * d,
        "mlp": s.depth * 2 * 2 * n * d * s.mlp_dim,
        "head": 2 * d * s.num_classes,
    }
    parts["total"] = sum(parts.values())
    return {k: float(v) for k, v in parts.items()}


VIT_B16 = ViTShape(image_size=224, patch_size=16, dim=768, depth=12, heads=12, mlp_dim=3072, num_classes=1000)


def digits_shape() -> ViTShape:
    from model_export.train import DIGITS_CONFIG as c

    return ViTShape(
        image_size=c.image_size,
        patch_size=c.patch_size,
        dim=c.dim,
        depth=c.depth,
        heads=c.heads,
        mlp_dim=int(c.dim * c.mlp_ratio),
        num_classes=c.num_classes,
    )


def _best_rate(fn: Callable[[], object], flops: float, repeats: int) -> float:
    fn()  # warm-up: thread pools, page faults
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return flops / best


def _matmul_session(int8: bool, n: int) -> Any:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if int8:
        a = helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])
        b = helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])
        y = helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])
        node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
    else:
        a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n])
        b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])
        node = helper.make_node("MatMul", ["a", "b"], ["y"])
    model = helper.make_model(
        helper.make_graph([node], "gemm", [a, b], [y]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def measure_gemm(n: int = 2048, repeats: int = 5, passes: int = 2) -> dict[str, float]:
    """GFLOP/s (GOP/s for INT8) of n x n x n multiplies: numpy SGEMM, onnxruntime SGEMM and INT8 GEMM."""
    rng = np.random.default_rng(0)
    flops = 2.0 * n**3
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    sgemm = _matmul_session(False, n)
    qgemm = _matmul_session(True, n)
    ua = rng.integers(0, 255, (n, n), dtype=np.uint8)
    sb = rng.integers(-127, 127, (n, n), dtype=np.int8)
    rates: dict[str, list[float]] = {"numpy_sgemm": [], "onnxruntime_sgemm": [], "onnxruntime_int8_gemm": []}
    for _ in range(passes):  # interleaved, so a noisy moment does not hit one of them only
        rates["numpy_sgemm"].append(_best_rate(lambda: a @ b, flops, repeats))
        rates["onnxruntime_sgemm"].append(_best_rate(lambda: sgemm.run(None, {"a": a, "b": b}), flops, repeats))
        rates["onnxruntime_int8_gemm"].append(_best_rate(lambda: qgemm.run(None, {"a": ua, "b": sb}), flops, repeats))
    best = {k: max(v) / 1e9 for k, v in rates.items()}
    best["sgemm"] = max(best["numpy_sgemm"], best["onnxruntime_sgemm"])
    return {k: round(v, 1) for k, v in best.items()}


def fastest(runs: list[dict[str, float]]) -> dict[str, float]:
    """The highest rates of several `measure_gemm` runs: the machine's ceiling (a noisy moment only lowers one)."""
    return {k: max(r[k] for r in runs) for k in runs[0]}


def ceiling(gemm: dict[str, float], shape: ViTShape) -> dict[str, float]:
    """Images/s the measured GEMM rates allow for one forward pass of `shape`."""
    flops = vit_flops(shape)["total"]
    return {
        "gflops_per_image": round(flops / 1e9, 4),
        "fp32_images_per_s": round(gemm["sgemm"] * 1e9 / flops, 2),
        "int8_images_per_s": round(gemm["onnxruntime_int8_gemm"] * 1e9 / flops, 2),
    }


if __name__ == "__main__":
    gemm = measure_gemm()
    print("GEMM (best of 5, 2048^3):", gemm)
    for name, shape in (("ViT-B/16", VIT_B16), ("digits-vit", digits_shape())):
        print(name, asdict(shape), {k: f"{v / 1e9:.3f} GFLOP" for k, v in vit_flops(shape).items()})
        print("  ceiling:", ceiling(gemm, shape))
