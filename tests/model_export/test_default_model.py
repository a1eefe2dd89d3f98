"""The committed default model, scored from the artifact exactly as the service runs it (no torch needed)."""

from __future__ import annotations

import pytest

from model_export.evaluate import score_digits
from tests.conftest import DEFAULT_MODEL, MODELS
from vit_artifact.metadata import read_metadata

INT8_MODEL = MODELS / "digits-vit-int8"


@pytest.fixture(scope="module")
def score():
    return score_digits(DEFAULT_MODEL)


def test_held_out_accuracy_is_at_least_97_percent(score):
    assert score.n >= 1000
    assert score.accuracy >= 0.97


def test_rollout_points_at_the_digit_at_least_90_percent(score):
    assert score.pointing_game >= 0.90


def test_recorded_scores_are_the_measured_ones(score):
    extra = read_metadata(DEFAULT_MODEL).extra
    assert extra["accuracy"] == pytest.approx(score.accuracy)
    assert extra["pointing_game"] == pytest.approx(score.pointing_game)


def test_artifact_is_small_and_self_describing():
    meta = read_metadata(DEFAULT_MODEL)
    size = sum(f.stat().st_size for f in DEFAULT_MODEL.iterdir())
    assert size < 4 * 2**20
    assert meta.labels == [str(d) for d in range(10)] and meta.parity.passed


def test_int8_variant_loses_at_most_half_a_point():
    meta = read_metadata(INT8_MODEL)
    assert meta.precision == "int8"
    assert meta.parity.accuracy_delta_points >= -0.5
    assert score_digits(INT8_MODEL).accuracy >= read_metadata(DEFAULT_MODEL).extra["accuracy"] - 0.005
