"""An artifact record names files of its own directory only: a graph path that climbs out of it, is absolute, or is
a link leading outside is refused before anything is opened or hashed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import DEFAULT_MODEL
from vit_artifact.metadata import METADATA_FILE, ArtifactError, read_metadata


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    directory = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, directory)
    return directory


def with_graph_file(directory: Path, file: str) -> None:
    path = directory / METADATA_FILE
    record = json.loads(path.read_text())
    record["graphs"]["classify"]["file"] = file
    path.write_text(json.dumps(record))


def test_the_committed_artifact_reads(artifact: Path) -> None:
    assert read_metadata(artifact).graphs["classify"].file == "model.onnx"


@pytest.mark.parametrize(
    "file", ["../../../../etc/passwd", "/etc/passwd", "sub/../../model.onnx", "..\\model.onnx", ""]
)
def test_a_graph_path_outside_the_directory_is_refused(artifact: Path, file: str) -> None:
    with_graph_file(artifact, file)
    with pytest.raises(ArtifactError, match="inside the artifact directory"):
        read_metadata(artifact)


def test_a_link_that_leads_outside_is_refused(artifact: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(artifact / "model.onnx", outside)
    (artifact / "linked.onnx").symlink_to(outside)
    with_graph_file(artifact, "linked.onnx")
    with pytest.raises(ArtifactError, match="lies outside"):
        read_metadata(artifact, verify_hashes=False)


def test_a_link_inside_the_directory_is_followed(artifact: Path) -> None:
    (artifact / "current").mkdir()
    (artifact / "current" / "model.onnx").symlink_to(artifact / "model.onnx")
    with_graph_file(artifact, "current/model.onnx")
    assert read_metadata(artifact).graphs["classify"].file == "current/model.onnx"
