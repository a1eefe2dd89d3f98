"""The gRPC stubs are generated per environment (keyed by the .proto and the protobuf and grpcio-tools versions),
never committed."""

from __future__ import annotations

import importlib.metadata
import subprocess

import pytest

from service.grpc_v2 import stubs
from tests.conftest import ROOT


def test_stubs_are_generated_once_per_key(tmp_path):
    first = stubs.generate(tmp_path)
    assert first.parent.parent.name == stubs.key(tmp_path)
    assert importlib.metadata.version("protobuf") in stubs.key(tmp_path)
    assert {p.name for p in first.glob("*.py")} == {"open_inference_grpc_pb2.py", "open_inference_grpc_pb2_grpc.py"}
    made = (first / "open_inference_grpc_pb2.py").stat().st_mtime_ns
    assert stubs.generate(tmp_path) == first  # found, not generated again
    assert (first / "open_inference_grpc_pb2.py").stat().st_mtime_ns == made
    assert [p.name for p in tmp_path.iterdir()] == [stubs.key(tmp_path)]  # no scratch directory left behind


def test_no_generated_code_is_committed():
    tracked = subprocess.run(["git", "ls-files", "service/grpc_v2"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "_pb2" not in tracked


def test_stubs_made_earlier_load_without_the_compiler(tmp_path, monkeypatch):
    """The image generates at build time and leaves grpcio-tools out: the server finds the stubs by .proto and
    protobuf alone."""
    made = stubs.generate(tmp_path)
    real = importlib.metadata.version

    def without_tools(name: str) -> str:
        if name == "grpcio-tools":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", without_tools)
    assert stubs.generate(tmp_path) == made
    with pytest.raises(stubs.StubError, match="no grpcio-tools"):
        stubs.key(tmp_path / "empty")
