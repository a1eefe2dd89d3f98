"""Which model the routes without a name use: `VITSERVE_DEFAULT_MODEL` when set; unset, the repository's only
model, or the embedded `digits-vit`; and a start that cannot tell says which setting to use and what it may name.

The choice is made where the repository is loaded (`service.core.runtime.choose_default`), so it is checked there in
this process, and once through a real `python -m service` on a repository without `digits-vit`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from service.core.loading import load_repository
from service.settings import Settings
from tests.conftest import DEFAULT_MODEL, MODELS, Server, free_port, run_cli
from vit_artifact.metadata import ArtifactError

INT8 = MODELS / "digits-vit-int8"


def repository_of(root: Path, *artifacts: Path) -> Path:
    for artifact in artifacts:
        shutil.copytree(artifact, root / artifact.name)
    return root


def test_unset_with_the_embedded_model_among_others_it_is_the_default():
    assert load_repository(Settings(model_dir=MODELS, provider="cpu")).default == "digits-vit"


def test_unset_with_one_model_that_model_is_the_default(tmp_path):
    repository = load_repository(Settings(model_dir=repository_of(tmp_path, INT8), provider="cpu"))
    assert repository.default == "digits-vit-int8"
    assert repository.get(None) is repository.models["digits-vit-int8"]


def test_set_it_wins_even_over_an_only_model(tmp_path):
    settings = Settings(model_dir=repository_of(tmp_path, INT8), provider="cpu", default_model="digits-vit")
    with pytest.raises(ArtifactError) as caught:
        load_repository(settings)
    message = str(caught.value)
    assert "default model 'digits-vit' (VITSERVE_DEFAULT_MODEL) is not among the models ['digits-vit-int8']" in message
    assert "set VITSERVE_DEFAULT_MODEL to the one" in message


def test_unset_with_several_models_and_no_embedded_one_names_the_setting_and_the_models(tmp_path):
    # Two models, neither of them digits-vit: which one the routes without a name mean is the user's to say.
    root = repository_of(tmp_path, INT8)
    shutil.copytree(INT8, root / "digits-vit-int8-copy")
    with pytest.raises(ArtifactError) as caught:
        load_repository(Settings(model_dir=root, provider="cpu"))
    message = str(caught.value)
    assert "(VITSERVE_DEFAULT_MODEL is unset)" in message
    assert "['digits-vit-int8', 'digits-vit-int8-copy']" in message and "set VITSERVE_DEFAULT_MODEL" in message


def test_only_the_models_served_count():
    # VITSERVE_MODELS narrows the repository to one model: that one is the default.
    repository = load_repository(Settings(model_dir=MODELS, models=["digits-vit-int8"], provider="cpu"))
    assert repository.default == "digits-vit-int8"


@pytest.mark.server
def test_a_server_on_a_repository_without_digits_vit_serves_its_only_model(tmp_path, held_out_pngs):
    srv = Server(repository_of(tmp_path / "models", INT8), tmp_path / "server.log").wait_ready()
    try:
        response = httpx.post(f"{srv.url}/v1/classify", content=held_out_pngs[0], headers={"content-type": "image/png"})
        assert response.status_code == 200, response.text
        assert response.json()["model"] == "digits-vit-int8"
    finally:
        assert srv.stop() == 0


@pytest.mark.server
def test_a_start_that_cannot_choose_exits_2_naming_the_setting(tmp_path, monkeypatch):
    root = repository_of(tmp_path, INT8)
    shutil.copytree(DEFAULT_MODEL, root / "my-vit")
    monkeypatch.setenv("VITSERVE_MODEL_DIR", str(root))
    monkeypatch.setenv("VITSERVE_PORT", str(free_port()))
    monkeypatch.delenv("VITSERVE_DEFAULT_MODEL", raising=False)
    result = run_cli("-m", "service", timeout=120)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "VITSERVE_DEFAULT_MODEL" in errors[0] and "['digits-vit-int8', 'my-vit']" in errors[0]
