#!/usr/bin/env bash
# Build the site and server images from the wheelhouse (offline; run build-wheelhouse.sh first).
#
#   BASE_IMAGE   base with Python 3.11 + venv (default: docker.io/library/python:3.11-slim-bookworm;
#                CI passes its local debootstrap image, e.g. localhost/clinfed-base:bookworm)
#   TAG          image tag (default: dev) -> localhost/clinfed-site:TAG, localhost/clinfed-server:TAG
#   ENGINE       podman (default when installed) or docker
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
BASE_IMAGE="${BASE_IMAGE:-docker.io/library/python:3.11-slim-bookworm}"
TAG="${TAG:-dev}"
ENGINE="${ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}"

if ! ls "$here"/wheelhouse/app/clinfed-*.whl >/dev/null 2>&1 || [ ! -f "$here/wheelhouse/deps/.stamp" ]; then
    echo "build-images.sh: no wheelhouse in $here/wheelhouse; run build-wheelhouse.sh first" >&2
    exit 2
fi

# Stage the Flower app folder for the server image: pyproject.toml + the files its fab-include
# names (code and conf/run.yaml) — never site data, policies or keys. Same bytes as the repository,
# so `clinfed app-hash` gives the same hash inside the image as on the host.
rm -rf "$here/app" && mkdir -p "$here/app/conf"
tar -C "$repo" --exclude=__pycache__ --exclude='*.pyc' -cf - \
    pyproject.toml clinfed client server models privacy | tar -C "$here/app" -xf -
cp "$repo/conf/run.yaml" "$here/app/conf/run.yaml"

# --format docker keeps HEALTHCHECK (the OCI format has no such field); --layers caches.
args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
if [ "$ENGINE" = podman ]; then args+=(--format docker --layers); fi
for role in site server; do
    start=$(date +%s)
    "$ENGINE" build "${args[@]}" -f "$here/Dockerfile.$role" -t "localhost/clinfed-$role:$TAG" "$here"
    echo "built localhost/clinfed-$role:$TAG in $(( $(date +%s) - start )) s"
done
