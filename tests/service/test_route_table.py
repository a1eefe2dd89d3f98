"""The route table (service/route_table.py) is the one place a route is declared: every FastAPI route is one of
its rows and every row is served; what the gate, the key check, the direct path and gRPC know of routes comes
from it."""

from __future__ import annotations

import pytest
from fastapi.routing import APIRoute

from service import route_table as table
from service.api import demo, docs, health, inference, metrics, models, repository, shared_memory, stats, v2
from service.http.fast_path import direct_target
from service.http.security import is_open

MODULES = (health, models, inference, stats, repository, v2, shared_memory, metrics, demo, docs)


def test_every_route_is_a_row_of_the_table_and_every_row_is_served() -> None:
    served = {
        (method, route.path, route.operation_id)
        for module in MODULES
        for route in module.router.routes
        if isinstance(route, APIRoute)
        for method in route.methods
    }
    declared = {(r.method, r.path, r.operation) for r in table.ROUTES}
    assert served == declared, {"served only": served - declared, "declared only": declared - served}


def test_a_model_pair_serves_one_handler_at_two_paths() -> None:
    routes = {r.operation_id: r for r in inference.router.routes if isinstance(r, APIRoute)}
    named, default = routes["classify"], routes["classify_default"]
    assert named.path == "/v1/models/{name}/classify" and default.path == "/v1/classify"
    assert [p.name for p in named.dependant.path_params] == ["name"]
    assert not default.dependant.path_params and "name" not in [q.name for q in default.dependant.query_params]


@pytest.mark.parametrize(
    ("method", "path", "inference", "control"),
    [
        ("POST", "/v1/classify", True, False),
        ("POST", "/v1/models/m/attention/batch", True, False),
        ("POST", "/v2/models/m/versions/2/infer", True, False),
        ("POST", "/v2/repository/models/m/load", False, True),
        ("POST", "/v2/systemsharedmemory/region/r/register", False, True),
        ("GET", "/v1/classify", False, False),
        ("POST", "/v1/classify/extra", False, False),
        ("POST", "/v2/models/stats", False, False),
    ],
)
def test_kinds_come_from_the_table(method: str, path: str, inference: bool, control: bool) -> None:
    assert table.is_inference(method, path) == inference
    assert table.is_control(method, path) == control


def test_open_routes_and_admin_routes_come_from_the_table() -> None:
    for route in table.ROUTES:
        path = route.path.format(name="m", version="1")
        assert is_open(path, table.OPEN) == (route.access == "open"), route
        assert table.is_admin(path) == (route.access == "admin"), route


@pytest.mark.parametrize(
    ("url", "template"),
    [
        (b"/v2/models/m/infer", "/v2/models/{name}/infer"),
        (b"/v2/models/m/versions/3/infer", "/v2/models/{name}/versions/{version}/infer"),
        (b"/v1/classify", "/v1/classify"),
        (b"/v1/classify?top_k=3", "/v1/classify"),
        (b"/v1/models/m/classify", "/v1/models/{name}/classify"),
        (b"/v1/classify?top_k=0", None),
        (b"/v1/classify?top_k=1001", None),
        (b"/v1/classify?x=1", None),
        (b"/v2/models/m/infer?x=1", None),
        (b"/v2/models/m%20x/infer", None),
        (b"/v1/attention", None),
    ],
)
def test_the_direct_path_takes_the_tables_direct_routes(url: bytes, template: str | None) -> None:
    target = direct_target(url)
    assert (target.template if target is not None else None) == template
    assert template is None or table.BY_OPERATION[next(r.operation for r in table.ROUTES if r.path == template)].direct


def test_grpc_calls_share_their_rest_twins_path() -> None:
    assert table.rest_path("v2_infer", name="m") == "/v2/models/m/infer"
    assert table.rest_path("v2_model_version_ready", name="m", version="2") == "/v2/models/m/versions/2/ready"
