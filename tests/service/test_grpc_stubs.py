"""The gRPC stubs are generated per environment (keyed by the .proto and the protobuf and grpcio-tools versions),
never committed."""

from __future__ import annotations

import importlib.metadata
import subprocess

from service.grpc_v2 import stubs
from tests.conftest import ROOT


def test_stubs_are_generated_once_per_key(tmp_path):
    first = stubs.generate(tmp_path)
    assert first.parent.parent.name == stubs.key()
    assert importlib.metadata.version("protobuf") in stubs.key()
    assert {p.name for p in first.glob("*.py")} == {"open_inference_grpc_pb2.py", "open_inference_grpc_pb2_grpc.py"}
    made = (first / "open_inference_grpc_pb2.py").stat().st_mtime_ns
    assert stubs.generate(tmp_path) == first  # found, not generated again
    assert (first / "open_inference_grpc_pb2.py").stat().st_mtime_ns == made
    assert [p.name for p in tmp_path.iterdir()] == [stubs.key()]  # no scratch directory left behind


def test_no_generated_code_is_committed():
    tracked = subprocess.run(["git", "ls-files", "service/grpc_v2"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "_pb2" not in tracked
