"""`python -m service` (or `vitserve`): serve the model repository over HTTP.

Flags override the `VITSERVE_*` environment. Models are loaded and warmed up before the port opens, so a
missing or broken artifact is a clear message and exit code 2, not a server that half works.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from pydantic import ValidationError

EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m service", description="Serve ViT artifacts over HTTP.")
    p.add_argument("--model-dir", help="model repository (VITSERVE_MODEL_DIR)")
    p.add_argument("--default-model", help="model for the routes without a name (VITSERVE_DEFAULT_MODEL)")
    p.add_argument("--host", help="bind address (VITSERVE_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (VITSERVE_PORT, default 8000)")
    p.add_argument("--provider", choices=["auto", "cpu", "cuda"], help="execution provider (VITSERVE_PROVIDER)")
    p.add_argument("--threads", type=int, help="intra-op threads per session (VITSERVE_THREADS)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name, value in vars(args).items():
        if value is not None:
            os.environ[f"VITSERVE_{name.upper()}"] = str(value)

    from service.artifact import ArtifactError
    from service.runtime import ProviderError
    from service.settings import Settings

    try:
        settings = Settings()
    except ValidationError as e:
        problems = "; ".join(f"VITSERVE_{'_'.join(map(str, err['loc'])).upper()}: {err['msg']}" for err in e.errors())
        print(f"error: invalid configuration: {problems}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from service.app import create_app, load_repository

    try:
        repository = load_repository(settings)
    except (ArtifactError, ProviderError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    app = create_app(settings, repository)
    logging.getLogger("vitserve").info(
        "serving %s on http://%s:%d (default model %s)",
        sorted(repository.models),
        settings.host,
        settings.port,
        repository.default,
    )
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal; this handler turns that into
    # exit code 0, so an orchestrator sees a clean shutdown.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
