"""The runtime's GPU path, checked on the CPU provider, whose IO-binding API is the same: a classify batch is copied
once into a bound host buffer that is reused from batch to batch, its logits land in a buffer allocated once, and
what `infer` returns is the caller's own; the batching and session layout a CUDA model gets by default; the CUDA
provider's options."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from service.core import runtime
from service.core.runtime import (
    CPU,
    CUDA,
    CUDA_MAX_BATCH_SIZE,
    INPUT_NAME,
    LOGITS,
    BoundBatch,
    load_model,
    provider_batching,
)
from service.core.state import batch_policy
from service.settings import Settings
from tests.conftest import DEFAULT_MODEL, MODELS


@pytest.fixture(scope="module")
def model() -> runtime.LoadedModel:
    return load_model(DEFAULT_MODEL, providers=[CPU], threads=1, cpu_rewrites=True)


def images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((3, 32, 32), dtype=np.float32) for _ in range(count)]


def plain(session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
    return session.run([LOGITS], {INPUT_NAME: batch})[0]


def test_a_bound_batch_gives_the_logits_of_a_plain_run_for_rows_or_an_array(model):
    assert model.classify is not None
    bound = BoundBatch(model.classify, 10, (3, 32, 32))
    for size in (1, 3, 16, 5, 32):
        rows = images(size, seed=size)
        want = plain(model.classify, np.stack(rows))
        np.testing.assert_array_equal(bound.run(rows), want)
        np.testing.assert_array_equal(bound.run(np.stack(rows)), want)


def test_on_the_cpu_provider_a_model_runs_its_staged_buffer_unbound_with_the_same_logits(model):
    assert model.classify is not None
    assert [i.bound.bind for i in model._instances] == [False] * len(model._instances)  # binding: devices only
    staged = BoundBatch(model.classify, 10, (3, 32, 32), bind=False)
    for size in (1, 16, 5):
        rows = images(size, seed=size)
        want = plain(model.classify, np.stack(rows))
        np.testing.assert_array_equal(staged.run(rows), want)
        np.testing.assert_array_equal(model.infer(rows, with_attention=False)[0], want)
    pixels = staged.pixels
    staged.run(images(16))
    assert staged.pixels is pixels and staged.runs == 0  # the same buffer, and never bound


def test_the_buffers_are_allocated_once_for_the_largest_batch_and_reused(model):
    assert model.classify is not None
    bound = BoundBatch(model.classify, 10, (3, 32, 32))
    bound.run(images(12))
    pixels, logits = bound.pixels, bound.logits
    assert (len(pixels), len(logits)) == (16, 16)  # the next power of two: a few sizes, a few allocations
    for size in (16, 1, 7, 12):
        bound.run(images(size))
        assert bound.pixels is pixels and bound.logits is logits
    bound.run(images(17))
    assert len(bound.pixels) == 32


def test_what_a_batch_returns_is_not_overwritten_by_the_next(model):
    assert model.classify is not None
    bound = BoundBatch(model.classify, 10, (3, 32, 32))
    first_rows, second_rows = images(4, seed=1), images(4, seed=2)
    first = bound.run(first_rows)
    kept = first.copy()
    bound.run(second_rows)
    np.testing.assert_array_equal(first, kept)
    assert not np.shares_memory(first, bound.logits)


def test_infer_takes_the_rows_the_batcher_collects_and_copies_them_once(model):
    rows = images(8, seed=3)
    logits, attentions = model.infer(rows, with_attention=False)
    assert attentions is None
    np.testing.assert_array_equal(logits, plain(model.classify, np.stack(rows)))
    with_maps, maps = model.infer(rows, with_attention=True)  # the attention graph takes the rows as well
    assert maps is not None and maps.shape[0] == 8
    np.testing.assert_allclose(with_maps, logits, rtol=0, atol=1e-5)


class Refusing:
    """A session whose IO binding fails (as a provider's might) while its plain `run` works."""

    def __init__(self, session: ort.InferenceSession, fail_after: int = 0) -> None:
        self.session, self.fail_after, self.bound_runs = session, fail_after, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)

    def run_with_iobinding(self, binding: Any) -> None:
        if self.bound_runs >= self.fail_after:
            raise RuntimeError("binding refused")
        self.bound_runs += 1
        self.session.run_with_iobinding(binding)


def test_a_binding_that_fails_from_the_first_run_is_given_up_and_the_batch_runs_unbound(model):
    assert model.classify is not None
    bound = BoundBatch(Refusing(model.classify), 10, (3, 32, 32))  # type: ignore[arg-type]
    rows = images(5)
    np.testing.assert_array_equal(bound.run(rows), plain(model.classify, np.stack(rows)))
    assert bound.unbound == "RuntimeError: binding refused"
    np.testing.assert_array_equal(bound.run(rows[:2]), plain(model.classify, np.stack(rows[:2])))


def test_a_binding_that_worked_and_then_fails_fails_that_batch(model):
    assert model.classify is not None
    bound = BoundBatch(Refusing(model.classify, fail_after=1), 10, (3, 32, 32))  # type: ignore[arg-type]
    bound.run(images(2))
    with pytest.raises(RuntimeError, match="binding refused"):
        bound.run(images(2))
    assert bound.unbound is None


def test_a_loaded_model_says_its_batches_run_bound(model):
    model.infer(images(3), with_attention=False)
    assert model.unbound == []


def test_an_fp16_graph_is_fed_and_read_in_its_own_types(tmp_path):
    """A graph that takes and gives FP16: the buffers have its types, and the caller still gets float32 logits."""
    onnx = pytest.importorskip("onnx")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    path = tmp_path / "fp16.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(DEFAULT_MODEL / "model.onnx")), keep_io_types=False), str(path))
    session = ort.InferenceSession(str(path), providers=[CPU])
    bound = BoundBatch(session, 10, (3, 32, 32))
    assert (bound.input_type, bound.output_type) == (np.float16, np.float16)
    rows = images(4)
    got = bound.run(rows)
    assert got.dtype == np.float32
    want = session.run([LOGITS], {INPUT_NAME: np.stack(rows).astype(np.float16)})[0]
    np.testing.assert_array_equal(got, want.astype(np.float32))


def policy_of(provider: str, directory: Path, **settings: Any) -> Any:
    model = SimpleNamespace(provider=provider, directory=directory, meta=SimpleNamespace(batch_invariant=True))
    return batch_policy(Settings(model_dir=MODELS, **settings), model)  # type: ignore[arg-type]


def test_a_cuda_model_batches_more_unless_the_settings_or_serving_json_say(tmp_path):
    assert policy_of(CUDA, tmp_path).max_batch_size == CUDA_MAX_BATCH_SIZE
    assert policy_of(CPU, tmp_path).max_batch_size == Settings.model_fields["max_batch_size"].default
    assert policy_of(CUDA, tmp_path, max_batch_size=8).max_batch_size == 8  # an operator's setting wins
    (tmp_path / "serving.json").write_text(json.dumps({"max_batch_size": 128}))
    assert policy_of(CUDA, tmp_path).max_batch_size == 128  # and the artifact's own, over both
    assert policy_of(CUDA, tmp_path, max_batch_size=8).max_batch_size == 128
    assert policy_of(CUDA, tmp_path, batching=False).max_batch_size == 1
    assert provider_batching(CPU, set()) == {}


def test_cuda_sessions_get_the_heuristic_convolution_search(monkeypatch):
    """Every new batch size is a new input shape: cuDNN's exhaustive search would time it on a request's clock."""
    seen: list[Any] = []

    def session(path: Any, options: Any, providers: Any, **kwargs: Any) -> None:
        seen.append(providers)

    monkeypatch.setattr(ort, "InferenceSession", session)
    runtime._session(DEFAULT_MODEL / "model.onnx", [CUDA, CPU], 0, cpu_rewrites=True)
    runtime._session(DEFAULT_MODEL / "model.onnx", [CPU], 0, cpu_rewrites=False)
    assert seen == [[(CUDA, runtime.CUDA_OPTIONS), CPU], [CPU]]
    assert runtime.CUDA_OPTIONS["cudnn_conv_algo_search"] == "HEURISTIC"
