"""The training command's pieces: the data is split by source digit, and training is deterministic."""

import numpy as np
import pytest
import torch

from model_export import digits
from model_export.train import RECIPES, TrainSettings, train


def test_held_out_digits_are_never_trained_on():
    images, _ = digits.load_sources()
    train_idx, held_idx = digits.split_sources(len(images))
    assert not set(train_idx) & set(held_idx)
    assert len(train_idx) + len(held_idx) == len(images)
    assert not set(digits.held_out_set().sources) & set(train_idx)


def test_canvases_place_the_digit_inside_its_box():
    images, labels = digits.load_sources()
    c = digits.make_canvases(images, labels, np.arange(50), copies=2, seed=1, spec=digits.CanvasSpec(clutter=(0, 0)))
    for canvas, (left, top, right, bottom) in zip(c.images, c.boxes, strict=True):
        inside = canvas[top:bottom, left:right].astype(int)
        outside = canvas.astype(int).copy()
        outside[top:bottom, left:right] = 0
        assert inside.max() > outside.max()  # ink is in the box; noise alone stays dim


def test_pointing_hits_uses_cell_centres():
    maps = np.zeros((2, 8, 8))
    maps[0, 1, 1] = 1  # centre (6, 6) in a 32-pixel canvas
    maps[1, 7, 7] = 1  # centre (30, 30)
    hits = digits.pointing_hits(maps, np.array([[4, 4, 10, 10], [4, 4, 10, 10]]), 32)
    assert hits.tolist() == [True, False]


def test_training_is_deterministic_for_a_seed():
    settings = TrainSettings(epochs=1, copies=1, batch_size=256)
    a, _ = train(settings, progress=False)
    b, _ = train(settings, progress=False)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


def test_training_puts_back_the_thread_count_and_determinism_flag():
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    train(TrainSettings(epochs=1, copies=1, batch_size=256, threads=1), progress=False)
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before


def test_the_large_recipe_scales_the_default_learning_rate_by_width():
    default, large = RECIPES["default"], RECIPES["large"]
    assert large.lr == pytest.approx(default.lr * default.model.dim / large.model.dim)
    assert large.model.image_size == default.model.image_size  # the same canvases and held-out set
