"""Images are tagged with the package version, whose one home is `service.__version__`. Kustomize cannot read it,
so docker/k8s states it once (components/pod-defaults); compose and the scripts take it from the environment or
from the package. These tests fail when any of them says another version."""

from __future__ import annotations

import re

import yaml

from service import __version__
from tests.conftest import ROOT
from tests.docker.test_k8s import K8S, TARGETS, kustomize

DOCKER = ROOT / "docker"
# An image reference with a literal tag (`vitserve:1.2.3`, `vitserve-cuda:1.2.3`) or a kustomize `newTag:`.
LITERAL_TAG = re.compile(r"\bvitserve(?:-cuda)?:(\d[\w.+-]*)|^\s*newTag:\s*[\"']?([^\s\"'#]+)", re.M)


def literal_tags() -> dict[str, list[str]]:
    """Literal tags in every text file under docker/, and in the deployment docs and README."""
    found = {}
    for path in sorted(
        [ROOT / "README.md", ROOT / "docs" / "deployment.md", *(p for p in DOCKER.rglob("*") if p.is_file())]
    ):
        if path.suffix not in {".yaml", ".yml", ".sh", ".py", ".cuda", ".md", ""}:
            continue
        tags = [a or b for a, b in LITERAL_TAG.findall(path.read_text())]
        if tags:
            found[str(path.relative_to(ROOT))] = tags
    return found


def test_every_literal_tag_under_docker_is_the_package_version() -> None:
    tags = literal_tags()
    wrong = {path: found for path, found in tags.items() if set(found) != {__version__}}
    assert not wrong, f"service.__version__ is {__version__}; these say otherwise: {wrong}"
    # and it is stated once: the kustomize component every manifest includes
    assert tags == {"docker/k8s/components/pod-defaults/kustomization.yaml": [__version__]}


def test_every_built_manifest_runs_the_versioned_image() -> None:
    for target in TARGETS:
        for doc in kustomize(K8S / target):
            spec = doc["spec"]
            pod = spec.get("template", {}).get("spec") or spec.get("predictor") or spec
            for container in pod.get("containers", []):
                assert container["image"].rsplit(":", 1)[1] == __version__, f"{target}: {container['image']}"


def test_compose_tags_its_images_from_the_environment() -> None:
    services = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]
    for name, service in services.items():
        image, _, tag = service["image"].partition(":")
        assert image in {"vitserve", "vitserve-cuda"}, name
        assert re.fullmatch(r"\$\{VITSERVE_VERSION:\?[^}]+\}", tag), f"{name}: tag {tag!r} is not ${{VITSERVE_VERSION}}"
