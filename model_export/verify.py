"""One validation routine for every export: output names, then shapes, then values within tolerance.

The source model (PyTorch) and both ONNX graphs are run on the same inputs: random tensors at a batch size
other than the one traced, and real photos through the artifact's own preprocessing. Shape mismatches and
logit differences over tolerance are fatal (`ParityError`); the measured numbers go into the artifact.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from vit_artifact.metadata import ATTENTIONS, INPUT_NAME, LOGITS, GraphFile, Parity, Preprocessing

from .sources import ExportSource, ParityError

log = logging.getLogger(__name__)

VERIFY_BATCH = 3  # differs from the trace batch on purpose
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "cat")


def sample_photos(spec: Preprocessing) -> np.ndarray | None:
    """Real photos that ship inside scikit-image's wheel, preprocessed as the service would; None without it."""
    try:
        import skimage.data
    except ImportError:
        return None
    from PIL import Image

    from vit_artifact.preprocessing import preprocess_batch

    images = []
    for name in PHOTOS:
        loader = getattr(skimage.data, name, None)
        if loader is not None:
            images.append(Image.fromarray(loader()).convert("RGB"))
    return preprocess_batch(images, spec) if images else None


def session(path: Path, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_in_batches(sess: ort.InferenceSession, x: np.ndarray, outputs: list[str], batch: int = 8) -> list[np.ndarray]:
    parts = [sess.run(outputs, {INPUT_NAME: x[i : i + batch]}) for i in range(0, len(x), batch)]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(outputs))]


def _reference(src: ExportSource, x: np.ndarray, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    logits, attentions = [], []
    with torch.no_grad(), src.patches():
        for i in range(0, len(x), batch):
            lg, att = src.model(torch.from_numpy(x[i : i + batch]))
            logits.append(lg.numpy())
            attentions.append(att.numpy())
    return np.concatenate(logits), np.concatenate(attentions)


def _check_outputs(sess: ort.InferenceSession, role: str, expected: list[str]) -> None:
    names = [o.name for o in sess.get_outputs()]
    if names != expected:
        raise ParityError(f"{role} graph outputs {names}, expected {expected}")


def _check_shape(role: str, name: str, got: tuple, want: tuple) -> None:
    if tuple(got) != tuple(want):
        raise ParityError(f"{role} graph output {name!r} has shape {tuple(got)}, the source model gives {want}")


def check_parity(
    src: ExportSource,
    directory: Path,
    graphs: dict[str, GraphFile],
    *,
    samples: np.ndarray | None = None,
    atol: float = 1e-4,
) -> Parity:
    rng = np.random.default_rng(0)
    feeds = [rng.standard_normal((VERIFY_BATCH, 3, *src.input_size), dtype=np.float32)]
    described = [f"{VERIFY_BATCH} random tensors (trace batch differs)"]
    real = samples if samples is not None else sample_photos(src.preprocessing)
    if real is not None:
        feeds.append(real.astype(np.float32))
        described.append(f"{len(real)} real images through the artifact's preprocessing")
    x = np.concatenate(feeds)

    ref_logits, ref_att = _reference(src, x)
    classify = session(directory / graphs["classify"].file)
    attention = session(directory / graphs["attention"].file)
    _check_outputs(classify, "classify", [LOGITS])
    _check_outputs(attention, "attention", [LOGITS, ATTENTIONS])
    (c_logits,) = run_in_batches(classify, x, [LOGITS])
    a_logits, a_att = run_in_batches(attention, x, [LOGITS, ATTENTIONS])
    n_tokens = src.num_prefix_tokens + src.grid[0] * src.grid[1]
    _check_shape("classify", LOGITS, c_logits.shape, ref_logits.shape)
    _check_shape("attention", LOGITS, a_logits.shape, ref_logits.shape)
    _check_shape("attention", ATTENTIONS, a_att.shape, ref_att.shape)
    _check_shape("attention", ATTENTIONS, a_att.shape[1:], (src.num_layers, src.num_heads, n_tokens, n_tokens))
    if ref_logits.shape[1] != len(src.labels):
        raise ParityError(f"the model has {ref_logits.shape[1]} classes but {len(src.labels)} labels")

    logit_diff = float(max(np.abs(c_logits - ref_logits).max(), np.abs(a_logits - ref_logits).max()))
    att_diff = float(np.abs(a_att - ref_att).max())
    agree = float(np.mean((c_logits.argmax(1) == ref_logits.argmax(1)) & (a_logits.argmax(1) == ref_logits.argmax(1))))
    log.info(
        "parity: max |logit diff| %.2e, max |attention diff| %.2e, top-1 agreement %.3f",
        logit_diff,
        att_diff,
        agree,
    )
    if not logit_diff <= atol:  # `not <=` also catches NaN
        raise ParityError(
            f"ONNX logits differ from the source model by up to {logit_diff:.3g} (tolerance {atol:g}); the export "
            "does not compute the same function. Check for unsupported ops or a model in training mode."
        )
    if not att_diff <= max(atol, 1e-4):
        raise ParityError(f"ONNX attention probabilities differ from the source by up to {att_diff:.3g}")
    return Parity(
        reference=f"{src.source.framework} eager (PyTorch {torch.__version__})",
        max_abs_logit_diff=logit_diff,
        max_abs_attention_diff=att_diff,
        top1_agreement=agree,
        tolerance=atol,
        inputs=described,
        passed=True,
    )
