import pytest
import torch

from model_export.vit import VisionTransformer, ViTConfig


def test_shapes_and_attention_rows_are_distributions():
    config = ViTConfig(image_size=32, patch_size=8, dim=32, depth=3, heads=4)
    model = VisionTransformer(config).eval()
    logits, attentions = model.forward_with_attention(torch.randn(5, 3, 32, 32))
    assert logits.shape == (5, 10)
    assert attentions.shape == (5, 3, 4, 1 + 16, 1 + 16)  # (B, layers, heads, tokens, tokens)
    torch.testing.assert_close(attentions.sum(-1), torch.ones(5, 3, 4, 17))
    torch.testing.assert_close(
        model(torch.zeros(2, 3, 32, 32)), model.forward_with_attention(torch.zeros(2, 3, 32, 32))[0]
    )


def test_position_embedding_makes_location_matter():
    # Without position embeddings a ViT is permutation invariant over patches; with them, moving content
    # to another patch changes the output.
    model = VisionTransformer(ViTConfig(image_size=16, patch_size=8, dim=16, depth=1, heads=2)).eval()
    x = torch.zeros(1, 3, 16, 16)
    x[..., :8, :8] = 1.0
    moved = torch.roll(x, shifts=(8, 8), dims=(2, 3))
    assert not torch.allclose(model(x), model(moved))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 30, "patch_size": 4}, "divisible by patch size"),
        ({"dim": 30, "heads": 4}, "divisible by the number of heads"),
    ],
)
def test_config_errors_say_what_is_wrong(kwargs, message):
    with pytest.raises(AssertionError, match=message):
        ViTConfig(**kwargs)
