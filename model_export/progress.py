"""Training progress for a person at a terminal, and for a log.

On a terminal, tqdm's bar is redrawn in place. Anywhere else (a file, a CI log, `make default-model | tee`), a
redrawn bar is a carriage return per step: thousands of them on one line of the log. There a plain line is
written instead at the end of each epoch and at most every `every_s` seconds within one, each whole on its own:

    train: epoch 3/20, step 378/2520 (15%), loss 1.234, 42 s, about 238 s left
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm


class TrainingProgress:
    """Call `step(epoch, loss)` after every optimiser step (epochs count from 0), then `close()`."""

    def __init__(
        self,
        *,
        epochs: int,
        steps_per_epoch: int,
        stream: TextIO | None = None,
        enabled: bool = True,
        every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.total = epochs * steps_per_epoch
        self.stream = stream if stream is not None else sys.stderr
        self.enabled, self.every_s, self.clock = enabled, every_s, clock
        self.done = 0
        self.started = self.last_line = clock()
        self.bar: tqdm | None = None
        if enabled and _is_terminal(self.stream):
            self.bar = tqdm(total=self.total, desc="train", unit="step", file=self.stream)

    def step(self, epoch: int, loss: float) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update()
            self.bar.set_postfix(epoch=epoch, loss=f"{loss:.3f}")
            return
        now = self.clock()
        if self.done % self.steps_per_epoch == 0 or self.done == self.total or now - self.last_line >= self.every_s:
            self.last_line = now
            self.stream.write(self.line(epoch, loss, now - self.started) + "\n")
            self.stream.flush()

    def line(self, epoch: int, loss: float, elapsed: float) -> str:
        left = elapsed * (self.total - self.done) / self.done if self.done else 0.0
        return (
            f"train: epoch {epoch + 1}/{self.epochs}, step {self.done}/{self.total} ({self.done / self.total:.0%}), "
            f"loss {loss:.3f}, {elapsed:.0f} s" + (f", about {left:.0f} s left" if self.done < self.total else "")
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
