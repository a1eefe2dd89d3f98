"""In-process onnxruntime at its best batch size: the served graphs called directly, the ceiling for any server.

The caller loads each model (a service.core.runtime.LoadedModel) as the server it compares with would: the same
graph rewrite, session layout and threads. Random pixel tensors go straight into `LoadedModel.infer`: no HTTP, no
decoding, no preprocessing, no queueing. A model of N instances (sessions) is called by N threads at once, as the
server's batcher runs up to N batches at once.

`sweep()` finds each model's best batch size; `now(label)` measures that batch size again, so that a benchmark
can take it in the same minute as the HTTP point it is compared with (the machine is shared and its speed drifts).
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from service.core.runtime import LoadedModel

BATCH_SIZES = (1, 4, 8, 16, 32)


class InProcess:
    """Images/s of loaded models called in this process; `models` maps a label (a precision, a model name) to one."""

    def __init__(self, models: dict[str, LoadedModel], batch_sizes: tuple[int, ...] = BATCH_SIZES, rounds: int = 3):
        self.models = models
        self.batch_sizes = batch_sizes
        self.rounds = rounds
        self.best: dict[str, int] = {}
        self._rng = np.random.default_rng(0)

    def _images_per_s(self, label: str, batch: int, min_seconds: float) -> float:
        model = self.models[label]
        x = self._rng.standard_normal((batch, 3, *model.meta.input_size), dtype=np.float32)
        started = time.perf_counter()

        def calls() -> int:  # one caller's calls until min_seconds have passed: a tiny model needs many
            done = 0
            while done == 0 or time.perf_counter() - started < min_seconds:
                model.infer(x, with_attention=False)
                done += 1
            return done

        with ThreadPoolExecutor(model.instances) as pool:
            total = sum(pool.map(lambda _: calls(), range(model.instances)))
        return total * batch / (time.perf_counter() - started)

    def sweep(self) -> dict:
        """Every batch size, `rounds` times (after a warm-up round for each batch shape); the medians, and the best."""
        results = {}
        for label in self.models:
            rates: dict[int, list[float]] = {b: [] for b in self.batch_sizes}
            for round_ in range(self.rounds + 1):
                for b in self.batch_sizes:
                    rate = self._images_per_s(label, b, 0.3)
                    if round_:
                        rates[b].append(rate)
            per_batch = {b: round(statistics.median(r), 2) for b, r in rates.items()}
            best = max(per_batch, key=per_batch.__getitem__)
            self.best[label] = best
            results[label] = {"images_per_s": per_batch, "best_batch": best, "best_images_per_s": per_batch[best]}
        return results

    def now(self, label: str, seconds: float = 1.0) -> float:
        """Images/s at the best batch size found by `sweep`, measured now (`seconds`, or one call of a slow model)."""
        return round(self._images_per_s(label, self.best[label], seconds), 2)
