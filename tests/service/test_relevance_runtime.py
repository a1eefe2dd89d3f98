"""Relevance rows in the runtime and the batcher, in this process: a batch mixing classify, attention and
relevance requests with different targets answers each as it would be answered alone."""

from __future__ import annotations

import asyncio

import numpy as np

from service.core.batching import BatchPolicy, DynamicBatcher
from tests.service.inprocess import load

POLICY = BatchPolicy(
    max_batch_size=16,
    max_queue_delay_ms=200,
    max_queue_size=64,
    timeout_s=30,
    enabled=True,
    admission="queue",
    latency_budget_ms=10_000,
)


def _images(n: int) -> list[np.ndarray]:
    return list(np.random.default_rng(0).standard_normal((n, 3, 32, 32), dtype=np.float32))


def test_mixed_rows_answer_as_alone():
    model = load()
    images = _images(5)
    targets = [3, None, -1, None, 9]
    logits, attentions, maps = model.infer_targets(images, targets, with_attention=True)
    assert attentions is not None
    for i, (image, target) in enumerate(zip(images, targets, strict=True)):
        if target is None:
            want_logits, want_att = model.infer([image], with_attention=True)
            np.testing.assert_allclose(attentions[i], want_att[0], atol=1e-6)
        else:
            want_logits, _, want_maps = model.infer_targets([image], [target], with_attention=False)
            np.testing.assert_allclose(maps[i], want_maps[0], rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(logits[i], want_logits[0], atol=1e-5)


def test_batcher_runs_other_targets_in_one_call():
    model = load()
    images = _images(6)

    async def run() -> list:
        batcher = DynamicBatcher(model, POLICY)
        try:
            relevance = [batcher.submit(im, with_attention=False, target=t) for t, im in enumerate(images[:4])]
            others = [batcher.submit(images[4], with_attention=False), batcher.submit(images[5], with_attention=True)]
            return list(await asyncio.gather(*relevance, *others))
        finally:
            await batcher.stop()

    results = asyncio.run(run())
    assert {r.batch_size for r in results} == {6}  # one runtime call
    for t, (image, result) in enumerate(zip(images[:4], results[:4], strict=True)):
        _, _, alone = model.infer_targets([image], [t], with_attention=False)
        np.testing.assert_allclose(result.relevance, alone[0], rtol=1e-4, atol=1e-9)
    assert results[4].relevance is None  # a classify row (the batch ran on the attention graph: it has those too)
    assert results[5].attentions is not None and results[5].relevance is None
