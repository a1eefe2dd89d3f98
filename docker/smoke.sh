#!/usr/bin/env bash
# Build the real image from the root Dockerfile and run it, on a machine with no Docker engine and no registry:
# podman builds (chroot isolation), buildah runs the image's entrypoint on the host network, and the host
# checks it (docker/smoke_check.py: readiness time, non-root, API parity, contents, graceful stop).
#
#   make docker-smoke                   # or: PYTHON=<dev venv python> docker/smoke.sh
#
# Needs root, podman, buildah and debootstrap (tests/docker/test_image.py installs them with apt-get). The base
# image is Debian bookworm from debootstrap (docker/base-image.sh, cached outside the clone); set BASE_IMAGE to
# build on another, e.g. python:3.11-slim-bookworm where a registry is reachable. The host's CA bundle goes
# to pip as a build secret (BUILD_CA, default /etc/ssl/certs/ca-certificates.crt): it is never in the image.
# SMOKE_REPORT=<file> keeps the JSON report. Exit code 0 only when the build and every check passed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
BUILD_CA=${BUILD_CA:-/etc/ssl/certs/ca-certificates.crt}
tag=localhost/vitserve:$("$PYTHON" -c 'import service; print(service.__version__)')-smoke-$$
work=$(mktemp -d -t vitserve-smoke.XXXXXX)
began=$SECONDS
say() { printf '[smoke %3ds] %s\n' $((SECONDS - began)) "$*" >&2; }
cleanup() {
    # The tag goes, the layers stay: they are the build cache of the next run.
    podman rmi --force "$tag" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

base=${BASE_IMAGE:-$(docker/base-image.sh)}
say "base image $base"

build=(podman build --isolation=chroot --format docker --layers --build-arg "BASE_IMAGE=$base" --tag "$tag")
[[ -s $BUILD_CA ]] && build+=(--secret "id=pip_cert,src=$BUILD_CA")
say "building $tag from Dockerfile"
if ! "${build[@]}" . >"$work/build.log" 2>&1; then
    tail -n 60 "$work/build.log" >&2
    say "build failed"
    exit 1
fi
say "built; running it"

report=${SMOKE_REPORT:-$work/report.json}
status=0
"$PYTHON" docker/smoke_check.py "$tag" --report "$report" || status=$?
say "$([[ $status == 0 ]] && echo passed || echo FAILED)"
exit "$status"
