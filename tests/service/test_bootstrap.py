"""What every process shares at start (service.procs.bootstrap): the supervisor's contract with its children
survives the trip through the environment, and start-up's objects are set aside from the garbage collector."""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

from service.procs.bootstrap import ChildEnv, freeze_heap


def test_a_child_reads_back_what_the_supervisor_wrote(tmp_path: Path) -> None:
    contract = ChildEnv(tmp_path, listen_fd=7, worker_index=2, ready_fd=9)
    env = contract.environ()
    assert ChildEnv.from_environ(env) == contract
    assert env[ChildEnv.ENGINE_SOCKET] == str(tmp_path / "engine.sock")
    assert env[ChildEnv.METRICS_DIR] == str(contract.metrics_dir) and env[ChildEnv.EXIT_WITH_PARENT] == "1"
    engine = dataclasses.replace(contract, listen_fd=None, worker_index=None)  # the engine gets no socket, no index
    read = ChildEnv.from_environ(engine.environ())
    assert (read.listen_fd, read.worker_index, read.ready_fd) == (None, None, 9)


def test_freezing_the_heap_sets_start_up_aside_from_the_collector() -> None:
    try:
        freeze_heap()
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
