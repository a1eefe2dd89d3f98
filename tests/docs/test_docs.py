"""`make docs` runs offline, and the explainer's tables are the code's own counts."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from model_export.complexity import STANDARD, count, crossover_tokens
from model_export.train import DIGITS_CONFIG
from model_export.vit import VisionTransformer
from tests.conftest import ROOT, run_cli

VIT_MD = ROOT / "docs" / "vit.md"


@pytest.mark.parametrize("name", [*STANDARD, "digits"])
def test_parameter_count_equals_pytorch(name):
    config = STANDARD.get(name, DIGITS_CONFIG)
    with torch.device("meta"):  # no memory for ViT-L's weights: only shapes are needed
        model = VisionTransformer(config)
    assert count(config).params == sum(p.numel() for p in model.parameters())


def test_vit_b16_flops_match_the_known_figure():
    # ViT-B/16 at 224x224 is quoted as 17.6 GMACs (timm, fvcore): 35.2 GFLOPs with a multiply-add as 2.
    assert count(STANDARD["ViT-B/16"]).flops / 1e9 == pytest.approx(35.2, rel=0.02)
    assert crossover_tokens(STANDARD["ViT-B/16"]) == 6 * 768


def test_committed_table_matches_the_code():
    text = VIT_MD.read_text()
    for name, config in [*STANDARD.items(), ("digits-vit", DIGITS_CONFIG)]:
        row = next(line for line in text.splitlines() if line.startswith(f"| {name}"))
        cost = count(config)
        assert f"{cost.params:,}" in row, row
        assert f"| {cost.flops / 1e9:.3f} |" in row, row


@pytest.mark.slow
def test_make_docs_runs_offline(tmp_path):
    shutil.copy(VIT_MD, tmp_path / "vit.md")
    result = run_cli("docs/make_docs.py", "--quick", "--out", str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stderr
    images = {p.name for p in (tmp_path / "images").glob("*.png")}
    assert {
        "patches.png",
        "position-embeddings.png",
        "attention-layers.png",
        "complexity.png",
        "digit-rollout.png",
    } <= images
    written = (tmp_path / "vit.md").read_text()
    assert re.search(r"\| ViT-B/16 \| 16 \| 768 \| 12 \| 12 \| 3072 \| 86,567,656", written)
    assert "Measured: t(N) =" in written
