# vitserve, CPU: the serving dependencies only (requirements/serve.txt: onnxruntime, no torch, no compilers) and
# the committed model repository, run as a non-root user.
#
#   docker build -t vitserve .
#   docker run --rm -p 8000:8000 vitserve
#
# BASE_IMAGE: any Debian-based image with Python 3.11 and the venv module: the official slim image (python at
# /usr/local/bin) or a debootstrap'd Debian (python3 at /usr/bin, see docker/base-image.sh). Both stages use
# the same base, so the virtual environment's interpreter link stays valid in the final stage.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
COPY requirements/serve.txt /tmp/serve.txt
COPY service/__init__.py /tmp/src/service/__init__.py
COPY service/grpc_v2 /tmp/src/service/grpc_v2
# Binary wheels only: nothing is compiled, so the build needs no compiler either. A machine whose TLS goes
# through an inspecting proxy passes its CA bundle as a build secret (`--secret id=pip_cert,src=<bundle>`):
# it is mounted for this step only and never written into a layer.
RUN --mount=type=secret,id=pip_cert \
    set -eu; \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    python3 -m venv /opt/venv; \
    /opt/venv/bin/python -m pip install --only-binary=:all: --no-deps -r /tmp/serve.txt; \
    PYTHONPATH=/tmp/src /opt/venv/bin/python -m service.grpc_v2.stubs /opt/grpc-stubs; \
    /opt/venv/bin/python -m pip uninstall -y -q grpcio-tools; \
    PYTHONPATH=/tmp/src /opt/venv/bin/python -c \
        "from pathlib import Path; from service.grpc_v2.stubs import load; load(Path('/opt/grpc-stubs'))"; \
    /opt/venv/bin/python -m pip check; \
    /opt/venv/bin/python -m pip uninstall -y -q pip setuptools; \
    /opt/venv/bin/python -c "import fastapi, grpc, numpy, onnxruntime, PIL, uvicorn"

FROM ${BASE_IMAGE}
RUN groupadd --gid 10001 vitserve \
    && useradd --uid 10001 --gid vitserve --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin vitserve
COPY --from=build /opt/venv /opt/venv
COPY models /models
COPY vit_artifact /app/vit_artifact
COPY service /app/service
# Bytecode now, as root, because the running container cannot write next to its read-only sources: without
# it every start would compile the service again (pip already compiled the virtual environment).
RUN /opt/venv/bin/python -m compileall -q /app/vit_artifact /app/service
# The gRPC stubs, generated in the build stage for this image's protobuf (VITSERVE_GRPC_STUBS_DIR below; the
# compiler, grpcio-tools, stays there: the running server only imports them).
COPY --from=build /opt/grpc-stubs /opt/grpc-stubs
RUN /opt/venv/bin/python -m compileall -q /opt/grpc-stubs
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VITSERVE_HOST=0.0.0.0 \
    VITSERVE_PORT=8000 \
    VITSERVE_MODEL_DIR=/models \
    VITSERVE_GRPC_STUBS_DIR=/opt/grpc-stubs
WORKDIR /app
USER 10001:10001
EXPOSE 8000
# Ready, not merely alive: /readyz answers 200 once every model is loaded and has run once.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('VITSERVE_PORT', '8000'), timeout=2)"]
# Exec form: python is PID 1 and receives SIGTERM itself; uvicorn stops accepting, finishes in-flight requests
# (up to 30 s) and exits 0.
ENTRYPOINT ["/opt/venv/bin/python", "-m", "service"]
