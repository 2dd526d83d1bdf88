#!/usr/bin/env bash
# CI setup for the container tests (tests/deploy/test_containers.py, `tox -e containers`):
# rootful podman, and a local base image built with debootstrap (no registry is reachable here).
# Idempotent: the base image and its rootfs tarball are cached under /var/tmp.
set -euo pipefail

BASE_IMAGE="${CLINFED_BASE_IMAGE:-localhost/clinfed-base:bookworm}"
CACHE="${CLINFED_BASE_CACHE:-/var/tmp/clinfed-base-bookworm.tar}"

if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y podman runc debootstrap
fi

# crun fails on these machines (hybrid cgroups, 20000 file limit): use runc and explicit ulimits.
mkdir -p /etc/containers
if ! grep -q 'runtime = "runc"' /etc/containers/containers.conf 2>/dev/null; then
    cat >/etc/containers/containers.conf <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
CONF
fi

if podman image exists "$BASE_IMAGE"; then
    echo "base image $BASE_IMAGE: present"
    exit 0
fi
if [ ! -s "$CACHE" ]; then
    rootfs="$(mktemp -d /var/tmp/clinfed-rootfs.XXXXXX)"
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase \
        --include=python3,python3-pip,python3-venv,ca-certificates,procps \
        bookworm "$rootfs"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -cf "$CACHE.tmp" . && mv "$CACHE.tmp" "$CACHE"
fi
podman import "$CACHE" "$BASE_IMAGE"
echo "base image $BASE_IMAGE: imported from $CACHE"
