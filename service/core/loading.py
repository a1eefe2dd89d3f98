"""Loading models as the settings say: the whole repository at start (every model loaded, warmed up and its
batching policy checked: all a start can fail on), and one version at a reload or a repository load."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from service.core.batching import BatchPolicy
from service.core.reload import Loader
from service.core.runtime import LoadedModel, ModelRepository, load_model, resolve_providers
from service.core.state import batch_policy
from service.settings import Settings, usable_cpus

log = logging.getLogger("vitserve")


def load_repository(settings: Settings) -> ModelRepository:
    """Every model, loaded and warmed up, with its batching policy checked: all a start can fail on."""
    providers = resolve_providers(settings.provider)
    log.info("execution providers: %s", providers)
    repository = ModelRepository.load(
        settings.model_dir,
        default=settings.default_model,
        providers=providers,
        threads=settings.threads,
        cpu_rewrites=settings.cpu_graph_rewrites,
        instances=settings.instances,
        cpus=usable_cpus(),
        only=settings.models,
        on_error=settings.on_model_error,
    )
    for model in repository.models.values():
        batch_policy(settings, model)
    return repository


def _load_version(settings: Settings, providers: list[str], directory: Path) -> tuple[LoadedModel, BatchPolicy]:
    model = load_model(
        directory,
        providers=providers,
        threads=settings.threads,
        cpu_rewrites=settings.cpu_graph_rewrites,
        instances=settings.instances,
        cpus=usable_cpus(),
    )
    return model, batch_policy(settings, model)


def version_loader(settings: Settings) -> Loader:
    """How a reload or the repository extension loads a version: as at start (hashes, sessions, warm-up)."""
    return functools.partial(_load_version, settings, resolve_providers(settings.provider))
