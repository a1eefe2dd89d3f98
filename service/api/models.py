"""What the server has loaded: every fact comes from the artifact's metadata."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.deps import State
from service.core.runtime import LoadedModel
from service.core.schemas import ErrorResponse, Grid, ModelInfo, ModelList, UnavailableModel
from service.route_table import endpoint

router = APIRouter(tags=["models"])


def model_info(model: LoadedModel, default: str) -> ModelInfo:
    m = model.meta
    return ModelInfo(
        name=model.name,
        version=m.version,
        precision=m.precision,
        provider=model.provider,
        labels_count=len(m.labels),
        labels=m.labels,
        input_size=m.input_size,
        patch_size=m.patch_size,
        grid=Grid(height=m.grid[0], width=m.grid[1]),
        layers=m.num_layers,
        heads=m.num_heads,
        prefix_tokens=m.num_prefix_tokens,
        attention=model.has_attention,
        relevance=model.has_relevance,
        preprocessing=m.preprocessing,
        source=m.source,
        parity=m.parity,
        default=model.name == default,
    )


@endpoint(router, "list_models", response_model=ModelList, summary="Loaded models")
async def list_models(state: State) -> ModelList:
    repo = state.models()
    return ModelList(
        default=repo.default,
        models=[model_info(m, repo.default) for m in repo.models.values()],
        unavailable=[UnavailableModel(name=n, error=f.error) for n, f in sorted(repo.unavailable.items())],
    )


@endpoint(
    router,
    "get_model",
    response_model=ModelInfo,
    summary="One model's facts",
    responses={404: {"model": ErrorResponse}, 503: {"model": ErrorResponse, "description": "it failed to load"}},
)
async def get_model(name: str, state: State) -> ModelInfo:
    return model_info(state.model(name), state.models().default)
