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
        "relevance.png",
        "digit-relevance-top1.png",
        "digit-relevance-top2.png",
    } <= images
    written = (tmp_path / "vit.md").read_text()
    assert re.search(r"\| ViT-B/16 \| 16 \| 768 \| 12 \| 12 \| 3072 \| 86,567,656", written)
    assert "Measured: t(N) =" in written


NAVIGABLE = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]


def anchors(text: str) -> set[str]:
    """GitHub's ids for the headings of a Markdown page (fenced code left out)."""
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    found = set()
    for heading in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


@pytest.mark.parametrize("page", NAVIGABLE, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_images_resolve(page):
    """Every relative link and image of the front page, docs/ and benchmarks/README.md names a file that exists,
    and a `#fragment` names one of that page's headings."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s) and mailto: not checked offline
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.relative_to(ROOT)}: {target} does not exist"
        if fragment and file.suffix == ".md":
            assert fragment in anchors(file.read_text()), f"{page.relative_to(ROOT)}: no heading for {target}"


def test_the_table_of_contents_lists_every_page():
    toc = (ROOT / "docs" / "README.md").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        assert page.name == "README.md" or f"]({page.name})" in toc, f"docs/README.md does not link {page.name}"
