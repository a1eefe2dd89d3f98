"""Training progress: a bar redrawn in place on a terminal, whole lines in a log."""

from __future__ import annotations

import io

from model_export.progress import TrainingProgress


class Clock:
    """A clock the test moves: the reporter's time, without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run(stream: io.StringIO, *, seconds_per_step: float, enabled: bool = True) -> list[str]:
    """Three epochs of four steps, each taking `seconds_per_step`; the lines written."""
    clock = Clock()
    progress = TrainingProgress(epochs=3, steps_per_epoch=4, stream=stream, enabled=enabled, every_s=30, clock=clock)
    for epoch in range(3):
        for step in range(4):
            clock.now += seconds_per_step
            progress.step(epoch, loss=2.0 - 0.1 * (4 * epoch + step))
    progress.close()
    return stream.getvalue().splitlines()


def test_a_log_gets_a_whole_line_per_epoch() -> None:
    log = io.StringIO()
    lines = run(log, seconds_per_step=1.0)
    assert "\r" not in log.getvalue()
    assert lines == [
        "train: epoch 1/3, step 4/12 (33%), loss 1.700, 4 s, about 8 s left",
        "train: epoch 2/3, step 8/12 (67%), loss 1.300, 8 s, about 4 s left",
        "train: epoch 3/3, step 12/12 (100%), loss 0.900, 12 s",
    ]


def test_a_long_epoch_also_gets_a_line_every_interval() -> None:
    log = io.StringIO()
    lines = run(log, seconds_per_step=20.0)  # a line when 30 s have passed since the last, and at each epoch's end
    assert [line.split(", ")[1] for line in lines] == [
        "step 2/12 (17%)",
        "step 4/12 (33%)",
        "step 6/12 (50%)",
        "step 8/12 (67%)",
        "step 10/12 (83%)",
        "step 12/12 (100%)",
    ]
    assert "\r" not in log.getvalue()


def test_a_terminal_gets_a_bar_redrawn_in_place() -> None:
    terminal = Terminal()
    run(terminal, seconds_per_step=1.0)
    out = terminal.getvalue()
    assert "\r" in out and "train: 100%" in out and "12/12" in out and "loss=0.900" in out
    assert "step 12/12 (100%)" not in out  # the bar, not the log lines


def test_disabled_writes_nothing() -> None:
    for stream in (io.StringIO(), Terminal()):
        assert run(stream, seconds_per_step=1.0, enabled=False) == []
