#!/usr/bin/env bash
# `make image-test`: build the CPU image and check it, the compose file and the Kubernetes chart.
#
# Installs what it needs: podman + runc + debootstrap (apt, as root), the validators into .venv-image
# from requirements/image.txt, and — no registry being reachable — the Debian base image, made with
# debootstrap and imported under the tag Dockerfile.cpu names. Then runs docker/tests. Anything that
# cannot be set up fails the run with the reason; nothing is skipped quietly.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BASE_TAG=docker.io/library/debian:bookworm-slim

missing=()
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
    [[ $(id -u) == 0 ]] || { echo "image-test: needs ${missing[*]} (apt-get install podman runc debootstrap) and root" >&2; exit 1; }
    echo "image-test: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc debootstrap >/dev/null
fi

# This machine's kernel needs runc (crun cannot run on its hybrid cgroup layout) and rlimits it allows.
conf=$ROOT/.image-test/containers.conf
mkdir -p "$(dirname "$conf")"
cat > "$conf" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
CONF
export CONTAINERS_CONF=$conf

if [[ ! -x .venv-image/bin/hadolint ]] || [[ requirements/image.txt -nt .venv-image/.installed ]]; then
    python3 -m venv .venv-image
    .venv-image/bin/pip install --quiet --require-hashes --no-deps -r requirements/image.txt
    touch .venv-image/.installed
fi

if ! podman image exists "$BASE_TAG"; then
    echo "image-test: making $BASE_TAG with debootstrap (no registry is reachable; ~3 min)" >&2
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase bookworm "$rootfs" >/dev/null
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import - "$BASE_TAG" >/dev/null
fi

export PATH=$ROOT/.venv-image/bin:$PATH
exec .venv/bin/python -m pytest docker/tests -p no:cacheprovider -rP "$@"
