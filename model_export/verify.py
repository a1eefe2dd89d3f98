"""One validation routine for every export: output names, then shapes, then values within tolerance.

The source model (PyTorch) and both ONNX graphs are run on the same inputs: random tensors at a batch size
other than the one traced, and real photos through the artifact's own preprocessing. Shape mismatches and
differences over tolerance are fatal (`ParityError`); the measured numbers go into the artifact.

Tolerances scale with the outputs (`Tolerance`): a model with logits of 50 carries float rounding ten times
that of one with logits of 5, while a real difference (a wrong op, a changed weight) is of the order of the
logits themselves. The CLI's --atol and --rtol set every gate.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from vit_artifact.metadata import (
    ATTENTIONS,
    INPUT_NAME,
    LOGITS,
    RELEVANCE,
    TARGET_NAME,
    GraphFile,
    Parity,
    Preprocessing,
)

from .sources import DEFAULT_TOLERANCE, ExportSource, ParityError, Tolerance

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


def _reference(
    src: ExportSource, x: np.ndarray, batch: int = 8, dtype: torch.dtype = torch.float32
) -> tuple[np.ndarray, np.ndarray]:
    logits, attentions = [], []
    src.model.to(dtype)
    try:
        with torch.no_grad(), src.patches():
            for i in range(0, len(x), batch):
                lg, att = src.model(torch.from_numpy(x[i : i + batch]).to(dtype))
                logits.append(lg.float().numpy())
                attentions.append(att.float().numpy())
    finally:
        src.model.float()  # float32 -> float64 -> float32 is exact: the model is unchanged
    return np.concatenate(logits), np.concatenate(attentions)


def _rounding(src: ExportSource, x: np.ndarray, logits: np.ndarray, attentions: np.ndarray) -> tuple[float, float]:
    """How far the source's own float32 outputs are from its float64 ones: the rounding noise of this model.

    Small for a well-conditioned model (about 1e-6); large where sharp attention and large weights amplify it.
    ONNX runs the same float32 maths in another order, so its difference from the source is of this order.
    """
    logits64, attentions64 = _reference(src, x, dtype=torch.float64)
    return float(np.abs(logits - logits64).max()), float(np.abs(attentions - attentions64).max())


def _check_outputs(sess: ort.InferenceSession, role: str, expected: list[str]) -> None:
    names = [o.name for o in sess.get_outputs()]
    if names != expected:
        raise ParityError(f"{role} graph outputs {names}, expected {expected}")


def _check_shape(role: str, name: str, got: tuple, want: tuple) -> None:
    if tuple(got) != tuple(want):
        raise ParityError(f"{role} graph output {name!r} has shape {tuple(got)}, the source model gives {want}")


def verification_inputs(src: ExportSource, samples: np.ndarray | None = None) -> tuple[np.ndarray, list[str]]:
    """Random tensors at a batch size other than the trace's, then real images; and what they are, in words."""
    rng = np.random.default_rng(0)
    feeds = [rng.standard_normal((VERIFY_BATCH, 3, *src.input_size), dtype=np.float32)]
    described = [f"{VERIFY_BATCH} random tensors (trace batch differs)"]
    real = samples if samples is not None else sample_photos(src.preprocessing)
    if real is not None:
        feeds.append(real.astype(np.float32))
        described.append(f"{len(real)} real images through the artifact's preprocessing")
    return np.concatenate(feeds), described


def check_parity(
    src: ExportSource,
    directory: Path,
    graphs: dict[str, GraphFile],
    *,
    samples: np.ndarray | None = None,
    tolerance: Tolerance = DEFAULT_TOLERANCE,
) -> Parity:
    x, described = verification_inputs(src, samples)
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
    scale = float(np.abs(ref_logits).max())
    logit_noise, att_noise = _rounding(src, x, ref_logits, ref_att)
    # probabilities' scale is 1; each bound also allows a multiple of the model's own float32 rounding
    logit_bound = tolerance.bound(scale, logit_noise)
    att_bound = tolerance.bound(1.0, att_noise)
    log.info(
        "parity: max |logit diff| %.2e (bound %.2e), max |attention diff| %.2e (bound %.2e), top-1 agreement %.3f",
        logit_diff,
        logit_bound,
        att_diff,
        att_bound,
        agree,
    )
    if not logit_diff <= logit_bound:  # `not <=` also catches NaN
        raise ParityError(
            f"ONNX logits differ from the source model by up to {logit_diff:.3g}, over the tolerance "
            f"{logit_bound:.3g} ({tolerance.describe(scale, logit_noise)}); the export does not compute the same "
            "function. "
            "Check for unsupported ops or a model in training mode; if the difference is float rounding in a "
            "model with large logits, raise --rtol"
        )
    if not att_diff <= att_bound:
        raise ParityError(
            f"ONNX attention probabilities differ from the source by up to {att_diff:.3g}, over the tolerance "
            f"{att_bound:.3g} ({tolerance.describe(1.0, att_noise)}); the export does not compute the same "
            "function. Raise --atol only if you know the difference is rounding"
        )
    relevance: dict[str, float] = {}
    if "relevance" in graphs:
        relevance = check_relevance_parity(
            src, directory / graphs["relevance"].file, x, ref_logits, tolerance=tolerance, logit_bound=logit_bound
        )
    return Parity(
        reference=f"{src.source.framework} eager (PyTorch {torch.__version__})",
        max_abs_logit_diff=logit_diff,
        max_abs_attention_diff=att_diff,
        max_abs_relevance_diff=relevance.pop("max_abs_relevance_diff", None),
        max_abs_reference_logit=scale,
        top1_agreement=agree,
        tolerance=logit_bound,
        atol=tolerance.atol,
        rtol=tolerance.rtol,
        inputs=described,
        passed=True,
        extra={
            **src.checks,
            "source_float32_logit_rounding": logit_noise,
            "rounding_factor": tolerance.rounding,
            "source_float32_attention_rounding": att_noise,
            **relevance,
        },
    )


def relevance_targets(logits: np.ndarray) -> np.ndarray:
    """The classes each image's relevance is checked for: its top prediction (asked for as -1, as the service
    does), its second and the last class. (K, B)."""
    order = np.argsort(-logits, axis=1)
    top = np.full(len(logits), -1)
    last = np.full(len(logits), logits.shape[1] - 1)
    return np.stack([top, order[:, min(1, logits.shape[1] - 1)], last]).astype(np.int64)


def _relevance_reference(
    src: ExportSource, x: np.ndarray, targets: np.ndarray, batch: int = 8, dtype: torch.dtype = torch.float32
) -> np.ndarray:
    """PyTorch autograd on the source model: (K, B, gh, gw) for targets (K, B)."""
    from .relevance import relevance_maps

    out = np.empty((*targets.shape, *src.grid), dtype=np.float64)
    src.model.to(dtype)
    try:
        with src.patches():
            for k, row in enumerate(targets):
                for i in range(0, len(x), batch):
                    _, maps = relevance_maps(
                        src.model,  # type: ignore[arg-type]  # every source wrapper has forward_blocks
                        torch.from_numpy(x[i : i + batch]).to(dtype),
                        torch.from_numpy(row[i : i + batch]),
                        num_prefix_tokens=src.num_prefix_tokens,
                        grid=src.grid,
                    )
                    out[k, i : i + batch] = maps.double().numpy()
    finally:
        src.model.float()
    return out


def scaled_maps(maps: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each map divided by its reference map's maximum |value| (1 for an all-zero reference): scale-free."""
    peak = np.abs(reference).reshape(*reference.shape[:-2], -1).max(axis=-1)[..., None, None]
    return maps / np.where(peak > 0, peak, 1.0)


def check_relevance_parity(
    src: ExportSource,
    path: Path,
    x: np.ndarray,
    ref_logits: np.ndarray,
    *,
    tolerance: Tolerance = DEFAULT_TOLERANCE,
    logit_bound: float | None = None,
) -> dict[str, float]:
    """The relevance graph against PyTorch autograd on `x`, for each image's top-1, top-2 and last class.

    Maps are compared divided by the reference map's maximum, so the bound is scale-free like the attention
    gate's; the min-max normalised difference (what the service draws) is recorded too.
    """
    from vit_artifact.attention import normalize_map

    sess = session(path)
    _check_outputs(sess, "relevance", [LOGITS, RELEVANCE])
    targets = relevance_targets(ref_logits)
    reference = _relevance_reference(src, x, targets)
    got = np.empty_like(reference)
    logit_diff = 0.0
    for k, row in enumerate(targets):
        for i in range(0, len(x), 8):
            logits, maps = sess.run([LOGITS, RELEVANCE], {INPUT_NAME: x[i : i + 8], TARGET_NAME: row[i : i + 8]})
            _check_shape("relevance", RELEVANCE, maps.shape[1:], src.grid)
            got[k, i : i + 8] = maps
            logit_diff = max(logit_diff, float(np.abs(logits - ref_logits[i : i + 8]).max()))
    diff = float(np.abs(scaled_maps(got, reference) - scaled_maps(reference, reference)).max())
    reference64 = _relevance_reference(src, x, targets, dtype=torch.float64)
    noise = float(np.abs(scaled_maps(reference, reference64) - scaled_maps(reference64, reference64)).max())
    normalised = max(
        float(np.abs(normalize_map(a) - normalize_map(b)).max())
        for a, b in zip(got.reshape(-1, *src.grid), reference.reshape(-1, *src.grid), strict=True)
    )
    bound = tolerance.bound(1.0, noise)
    scale = float(np.abs(ref_logits).max())
    logit_bound = tolerance.bound(scale) if logit_bound is None else logit_bound
    log.info(
        "relevance parity: max |scaled map diff| %.2e (bound %.2e), min-max normalised %.2e", diff, bound, normalised
    )
    if not logit_diff <= logit_bound:
        raise ParityError(
            f"the relevance graph's logits differ from the source model by up to {logit_diff:.3g}, over the "
            f"tolerance {logit_bound:.3g} (as the classify graph's: {tolerance.describe(scale)}, and the source's "
            "own float32 rounding)"
        )
    if not diff <= bound:
        raise ParityError(
            f"ONNX relevance maps differ from PyTorch autograd by up to {diff:.3g} of their maximum, over the "
            f"tolerance {bound:.3g} ({tolerance.describe(1.0, noise)}); the traced backward pass does not compute "
            "the gradient autograd does. Raise --atol only if you know the difference is rounding"
        )
    return {
        "max_abs_relevance_diff": diff,
        "relevance_normalised_diff": normalised,
        "relevance_logit_diff": logit_diff,
        "relevance_tolerance": bound,
        "source_float32_relevance_rounding": noise,
        "relevance_targets_per_image": float(len(targets)),
    }
