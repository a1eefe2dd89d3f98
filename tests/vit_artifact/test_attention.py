"""Attention maps on small attention tensors whose answers were worked out by hand.

Tokens are named c (class), d (DeiT distillation) and p0..p3 (a 2x2 patch grid, row-major). Expected values in
the comments are the arithmetic done on paper; the tests never call the code under test to get them.
"""

from __future__ import annotations

import numpy as np
import pytest

from vit_artifact.attention import (
    BadArguments,
    NoSuchIndex,
    attention_map,
    cls_attention,
    discard_lowest,
    fuse_heads,
    per_layer_cls_maps,
    rollout,
    rollout_matrix,
)

GRID = (2, 2)
N = 5  # c, p0, p1, p2, p3


def one_hot_columns(column: int, n: int = N) -> np.ndarray:
    """Every token attends only to `column`."""
    w = np.zeros((n, n))
    w[:, column] = 1.0
    return w


def uniform(n: int = N) -> np.ndarray:
    return np.full((n, n), 1.0 / n)


def random_attention(rng: np.random.Generator, layers: int, heads: int, n: int) -> np.ndarray:
    return rng.dirichlet(np.ones(n), size=(layers, heads, n))  # (L, H, N, N), rows sum to 1


# Layer 1: head a sends every token to p0, head b is the identity. Layer 2: both heads uniform.
TWO_LAYERS = np.stack(
    [
        np.stack([one_hot_columns(1), np.eye(N)]),
        np.stack([uniform(), uniform()]),
    ]
)  # (2, 2, 5, 5)


# --- head fusion -----------------------------------------------------------------------------------------


def test_fuse_heads_mean_max_min_on_one_layer() -> None:
    heads = np.array([[[0.2, 0.8], [0.6, 0.4]], [[0.4, 0.6], [1.0, 0.0]]])  # (H=2, 2, 2)
    np.testing.assert_allclose(fuse_heads(heads, "mean"), [[0.3, 0.7], [0.8, 0.2]])
    np.testing.assert_allclose(fuse_heads(heads, "max"), [[0.4, 0.8], [1.0, 0.4]])
    np.testing.assert_allclose(fuse_heads(heads, "min"), [[0.2, 0.6], [0.6, 0.0]])


def test_fuse_heads_keeps_the_layer_axis() -> None:
    assert fuse_heads(TWO_LAYERS, "mean").shape == (2, N, N)


def test_fuse_heads_rejects_unknown_fusion() -> None:
    with pytest.raises(BadArguments, match="median"):
        fuse_heads(TWO_LAYERS, "median")  # type: ignore[arg-type]


# --- rollout, worked by hand -----------------------------------------------------------------------------


def test_rollout_matrix_mean_fusion_by_hand() -> None:
    # Layer 1, mean of heads = 0.5*onehot(p0) + 0.5*I; A1 = (W + I)/2 = 0.25*onehot(p0) + 0.75*I:
    #   A1[c] = [.75, .25, 0, 0, 0], A1[p0] = [0, 1, 0, 0, 0], A1[pk] = .25 at p0, .75 at pk.
    # Layer 2, W = 1/5 everywhere; A2[c] = [.6, .1, .1, .1, .1].
    # R[c] = .6*A1[c] + .1*(A1[p0] + A1[p1] + A1[p2] + A1[p3]) = [.45, .325, .075, .075, .075]
    rolled = rollout_matrix(TWO_LAYERS, head_fusion="mean")
    np.testing.assert_allclose(rolled[0], [0.45, 0.325, 0.075, 0.075, 0.075])


def test_rollout_matrix_max_fusion_by_hand() -> None:
    # Layer 1, max of heads: row c = [1, 1, 0, 0, 0], row p0 = [0, 1, 0, 0, 0], row pk = 1 at p0 and pk.
    # (W + I)/2 then rows renormalised: A1[c] = [2/3, 1/3, 0, 0, 0], A1[p0] = e_p0,
    # A1[pk] = 1/3 at p0, 2/3 at pk. Layer 2 as before: A2[c] = [.6, .1, .1, .1, .1].
    # R[c] = [.6*2/3, .6/3 + .1 + 3*.1/3, .1*2/3, .1*2/3, .1*2/3] = [.4, .4, 1/15, 1/15, 1/15]
    rolled = rollout_matrix(TWO_LAYERS, head_fusion="max")
    np.testing.assert_allclose(rolled[0], [0.4, 0.4, 1 / 15, 1 / 15, 1 / 15])


def test_rollout_matrix_min_fusion_by_hand() -> None:
    # Layer 1, min of heads: only (p0, p0) survives, so after (W + I)/2 and renormalising A1 = I.
    # R[c] = A2[c] = [.6, .1, .1, .1, .1]
    rolled = rollout_matrix(TWO_LAYERS, head_fusion="min")
    np.testing.assert_allclose(rolled[0], [0.6, 0.1, 0.1, 0.1, 0.1])
    # ... and a constant patch row is a flat map: zeros, not NaN.
    flat = rollout(TWO_LAYERS, num_prefix_tokens=1, grid=GRID, head_fusion="min")
    np.testing.assert_array_equal(flat, np.zeros(GRID))


def test_rollout_map_one_layer_by_hand() -> None:
    w = uniform()
    w[0] = [0.2, 0.1, 0.4, 0.1, 0.2]
    # A[c] = (W[c] + e_c)/2, patch part = [.05, .2, .05, .1]; (x - .05) / .15 = [0, 1, 0, 1/3]
    heat = rollout(w[None, None], num_prefix_tokens=1, grid=GRID)
    np.testing.assert_allclose(heat, [[0.0, 1.0], [0.0, 1 / 3]], atol=1e-6)


def test_rollout_map_two_layers_multiplies_later_layers_on_the_left() -> None:
    # Layer 1 as in TWO_LAYERS (mean fusion). Layer 2: every row is v = [.2, .2, .4, .2, 0].
    # A2[c] = .5*v + .5*e_c = [.6, .1, .2, .1, 0]
    # R[c] = .6*A1[c] + .1*A1[p0] + .2*A1[p1] + .1*A1[p2] = [.45, .325, .15, .075, 0]
    # patches [.325, .15, .075, 0] / .325 = [1, 6/13, 3/13, 0]
    # (A1 @ A2 would give patches [.225, .2, .1, 0] instead.)
    v = np.tile([0.2, 0.2, 0.4, 0.2, 0.0], (N, 1))
    attn = np.stack([TWO_LAYERS[0], np.stack([v, v])])  # (2, 2, 5, 5)
    heat = rollout(attn, num_prefix_tokens=1, grid=GRID)
    np.testing.assert_allclose(heat, [[1.0, 6 / 13], [3 / 13, 0.0]], atol=1e-6)


# --- discarding the weakest attention --------------------------------------------------------------------

DISCARD_CASE = np.array(
    [
        [0.01, 0.04, 0.15, 0.30, 0.50],  # c
        [0.05, 0.35, 0.20, 0.20, 0.20],  # p0
        [0.20, 0.20, 0.20, 0.20, 0.20],  # p1
        [0.20, 0.20, 0.20, 0.20, 0.20],  # p2
        [0.20, 0.20, 0.20, 0.20, 0.20],  # p3
    ]
)


def test_discard_lowest_spares_class_to_class() -> None:
    # int(25 * 0.15) = 3 smallest: (c, c) = .01, (c, p0) = .04, (p0, c) = .05; (c, c) is kept.
    kept = discard_lowest(DISCARD_CASE, 0.15)
    expected = DISCARD_CASE.copy()
    expected[0, 1] = 0.0
    expected[1, 0] = 0.0
    np.testing.assert_array_equal(kept, expected)
    assert DISCARD_CASE[0, 1] == 0.04, "the input must not be modified"


def test_rollout_with_discard_ratio_by_hand() -> None:
    # After discarding: W[c] = [.01, 0, .15, .3, .5]; (W[c] + e_c)/2 = [.505, 0, .075, .15, .25], sum .98,
    # renormalised. Patches [0, .075, .15, .25] / .98, stretched: [0, .3, .6, 1].
    heat = rollout(DISCARD_CASE[None, None], num_prefix_tokens=1, grid=GRID, discard_ratio=0.15)
    np.testing.assert_allclose(heat, [[0.0, 0.3], [0.6, 1.0]], atol=1e-6)
    # Without discarding: patches [.02, .075, .15, .25] / 2, stretched: (x - .02) / .23.
    plain = rollout(DISCARD_CASE[None, None], num_prefix_tokens=1, grid=GRID)
    np.testing.assert_allclose(plain, [[0.0, 0.055 / 0.23], [0.13 / 0.23, 1.0]], atol=1e-6)


def test_discard_ratio_zero_changes_nothing() -> None:
    attn = random_attention(np.random.default_rng(0), 3, 2, N)
    np.testing.assert_array_equal(rollout_matrix(attn, discard_ratio=0.0), rollout_matrix(attn))


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_rollout_rows_stay_stochastic_after_every_layer(ratio: float, fusion: str) -> None:
    rng = np.random.default_rng(int(ratio * 100) + len(fusion))
    n = 1 + 9
    attn = random_attention(rng, 6, 3, n)  # (6, 3, 10, 10)
    for depth in range(1, attn.shape[0] + 1):
        rolled = rollout_matrix(attn[:depth], head_fusion=fusion, discard_ratio=ratio)  # type: ignore[arg-type]
        assert (rolled >= 0).all()
        np.testing.assert_allclose(rolled.sum(axis=-1), np.ones(n), atol=1e-9)


# --- qualitative behaviour -------------------------------------------------------------------------------


def test_identity_attention_gives_a_flat_map_of_zeros() -> None:
    attn = np.broadcast_to(np.eye(N), (4, 3, N, N))  # (L, H, N, N)
    for method in ("rollout", "cls"):
        heat = attention_map(attn, method=method, num_prefix_tokens=1, grid=GRID)
        np.testing.assert_array_equal(heat, np.zeros(GRID))
        assert heat.dtype == np.float32


@pytest.mark.parametrize("patch", range(4))
def test_attending_to_one_patch_puts_the_maximum_there(patch: int) -> None:
    rng = np.random.default_rng(patch)
    noise = random_attention(rng, 4, 3, N)
    attn = 0.2 * noise + 0.8 * one_hot_columns(1 + patch)  # (4, 3, 5, 5)
    for method in ("rollout", "cls"):
        heat = attention_map(attn, method=method, num_prefix_tokens=1, grid=GRID)
        assert np.unravel_index(heat.argmax(), GRID) == divmod(patch, GRID[1])
        assert heat.max() == 1.0 and heat.min() == 0.0


def test_deit_distillation_token_is_neither_query_nor_patch() -> None:
    n = 2 + 4  # c, d, p0..p3
    w = np.full((n, n), 1.0 / n)
    w[0] = [0.1, 0.5, 0.1, 0.2, 0.0, 0.1]  # c: patches [.1, .2, 0, .1] -> [.5, 1, 0, .5]
    w[1] = [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]  # d looks only at p0: must not matter
    heat = cls_attention(w[None, None], num_prefix_tokens=2, grid=GRID)
    np.testing.assert_allclose(heat, [[0.5, 1.0], [0.0, 0.5]], atol=1e-6)
    # One layer of rollout: (W[c] + e_c)/2 over the patches is W[c]/2, same stretched map.
    rolled = rollout(w[None, None], num_prefix_tokens=2, grid=GRID)
    np.testing.assert_allclose(rolled, [[0.5, 1.0], [0.0, 0.5]], atol=1e-6)


def test_layer_method_picks_the_layer_and_head() -> None:
    attn = np.broadcast_to(uniform(), (3, 2, N, N)).copy()  # (3, 2, 5, 5)
    attn[1, 0, 0] = [0.0, 0.0, 0.0, 0.0, 1.0]  # layer 1, head 0: c -> p3
    attn[1, 1, 0] = [0.0, 0.0, 0.5, 0.5, 0.0]  # layer 1, head 1: c -> p1, p2
    head0 = attention_map(attn, method="layer", layer=1, head=0, num_prefix_tokens=1, grid=GRID)
    np.testing.assert_array_equal(head0, [[0, 0], [0, 1]])
    head1 = attention_map(attn, method="layer", layer=1, head=-1, num_prefix_tokens=1, grid=GRID)
    np.testing.assert_array_equal(head1, [[0, 1], [1, 0]])
    # Fused: mean [0, .25, .25, .5] -> [0, .5, .5, 1]; max [0, .5, .5, 1] -> same; min all 0 -> flat.
    mean = attention_map(attn, method="layer", layer=1, num_prefix_tokens=1, grid=GRID)
    np.testing.assert_allclose(mean, [[0, 0.5], [0.5, 1]])
    low = attention_map(attn, method="layer", layer=1, head_fusion="min", num_prefix_tokens=1, grid=GRID)
    np.testing.assert_array_equal(low, np.zeros(GRID))


def test_negative_layer_counts_from_the_last_and_cls_is_the_last_layer() -> None:
    attn = random_attention(np.random.default_rng(3), 4, 2, N)
    last = attention_map(attn, method="layer", layer=-1, num_prefix_tokens=1, grid=GRID)
    np.testing.assert_array_equal(last, attention_map(attn, method="layer", layer=3, num_prefix_tokens=1, grid=GRID))
    np.testing.assert_array_equal(last, attention_map(attn, method="cls", num_prefix_tokens=1, grid=GRID))


def test_per_layer_cls_maps_matches_single_maps() -> None:
    attn = random_attention(np.random.default_rng(4), 3, 2, N)
    maps = per_layer_cls_maps(attn, num_prefix_tokens=1, grid=GRID)
    assert maps.shape == (3, 2, *GRID)
    for layer in range(3):
        for head in range(2):
            one = attention_map(attn, method="layer", layer=layer, head=head, num_prefix_tokens=1, grid=GRID)
            np.testing.assert_array_equal(maps[layer, head], one)


def test_non_square_grid_is_row_major() -> None:
    n = 1 + 6  # grid 2 rows x 3 cols
    w = np.full((n, n), 1.0 / n)
    w[0] = [0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.5]  # c -> patch 2 (row 0, col 2) and patch 5 (row 1, col 2)
    heat = cls_attention(w[None, None], num_prefix_tokens=1, grid=(2, 3))
    np.testing.assert_array_equal(heat, [[0, 0, 1], [0, 0, 1]])


# --- argument errors -------------------------------------------------------------------------------------

TWELVE = np.broadcast_to(uniform(), (12, 12, N, N))  # (12 layers, 12 heads, 5, 5)


def call(**kwargs: object) -> np.ndarray:
    return attention_map(TWELVE, num_prefix_tokens=1, grid=GRID, **kwargs)  # type: ignore[arg-type]


def test_missing_layer_is_not_found_with_a_useful_message() -> None:
    with pytest.raises(NoSuchIndex) as info:
        call(method="layer", layer=14)
    assert info.value.message == "layer 14 does not exist; this model has 12 layers (0-11)"
    assert info.value.detail == {"layer": 14, "num_layers": 12}
    with pytest.raises(NoSuchIndex, match="layer -13 does not exist"):
        call(method="layer", layer=-13)


def test_missing_head_is_not_found() -> None:
    with pytest.raises(NoSuchIndex, match=r"head 12 does not exist; this model has 12 heads \(0-11\)"):
        call(method="layer", layer=0, head=12)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_discard_ratio_outside_unit_interval_is_invalid(ratio: float) -> None:
    with pytest.raises(BadArguments, match="discard_ratio"):
        call(method="rollout", discard_ratio=ratio)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "rollout", "layer": 3}, "layer applies to method 'layer'"),
        ({"method": "rollout", "head": 0}, "head applies to method 'layer'"),
        ({"method": "cls", "layer": -1}, "layer applies to method 'layer'"),
        ({"method": "cls", "head": 2}, "head applies to method 'layer'"),
        ({"method": "cls", "discard_ratio": 0.5}, "discard_ratio applies to method 'rollout'"),
        ({"method": "layer"}, "needs a layer"),
        ({"method": "layer", "layer": 0, "head": 1, "head_fusion": "max"}, "not both"),
        ({"method": "gradcam"}, "method 'gradcam' is not one of"),
        ({"method": "rollout", "head_fusion": "median"}, "head_fusion 'median'"),
        ({"method": "layer", "layer": 1.5}, "layer must be an integer"),
    ],
)
def test_bad_argument_combinations_are_invalid(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(BadArguments, match=match) as info:
        call(**kwargs)
    assert info.value.message


def test_attention_that_does_not_match_the_grid_is_a_server_fault() -> None:
    with pytest.raises(ValueError, match="does not match"):
        attention_map(TWELVE, method="cls", num_prefix_tokens=2, grid=GRID)
    with pytest.raises(ValueError, match="one image"):
        attention_map(TWELVE[None], method="cls", num_prefix_tokens=1, grid=GRID)


def test_the_service_answers_bad_map_arguments_as_client_errors() -> None:
    from service.core.pipeline import attention_grid
    from service.core.schemas import AttentionParams
    from service.errors import InvalidParameter, NotFound

    class Meta:  # the two facts attention_grid reads from an artifact's metadata
        num_prefix_tokens = 1
        grid = GRID

    with pytest.raises(NotFound) as missing:
        attention_grid(TWELVE, Meta(), "layer", AttentionParams(layer=14))  # type: ignore[arg-type]
    assert missing.value.status == 404 and missing.value.detail == {"layer": 14, "num_layers": 12}
    with pytest.raises(InvalidParameter) as invalid:
        attention_grid(TWELVE, Meta(), "cls", AttentionParams(discard_ratio=0.5))  # type: ignore[arg-type]
    assert invalid.value.status == 422
