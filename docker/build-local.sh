#!/usr/bin/env bash
# Build the lbgm image on a machine that reaches no image registry (Debian, root), from nothing
# installed: the engine (podman + runc from apt), a Debian base image (debootstrap, then podman
# import), then the project image (docker/Dockerfile with BASE_IMAGE set to that base). Prints how
# long each step took and how big the images are. Idempotent: steps whose result exists are skipped
# (--rebuild-base makes the base again).
#
#   docker/build-local.sh [--tag localhost/lbgm:dev] [--rebuild-base]
#
# pip inside the build reaches the package registry over the host network with this machine's pip
# configuration and CA bundle, and takes torch from the local wheel folder (both mounted read-only).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tag="localhost/lbgm:dev"
base="localhost/lbgm-base:bookworm"
rebuild_base=0
while (($#)); do
  case "$1" in
    --tag) tag="$2"; shift 2 ;;
    --rebuild-base) rebuild_base=1; shift ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-local.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ $(id -u) == 0 ]] || { echo "build-local.sh: run as root (apt, debootstrap, podman)" >&2; exit 2; }

step() {  # step NAME COMMAND...: run it and report its duration
  local name="$1" started=$SECONDS
  shift
  "$@"
  printf '%-28s %4d s\n' "$name" $((SECONDS - started)) >&2
}

install_engine() {
  if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
    # A fresh machine may have no package lists yet: fetch them when the first try fails.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc debootstrap >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman runc debootstrap >/dev/null; }
  fi
  # The sandbox refuses podman's default rlimits, and crun its hybrid cgroups.
  mkdir -p /etc/containers
  if ! grep -qs 'cgroup_manager = "cgroupfs"' /etc/containers/containers.conf; then
    printf '[containers]\ndefault_ulimits = []\n\n[engine]\ncgroup_manager = "cgroupfs"\nruntime = "runc"\n' \
      > /etc/containers/containers.conf
  fi
}

build_base() {
  if ((rebuild_base == 0)) && podman image exists "$base"; then
    return
  fi
  local rootfs
  rootfs="$(mktemp -d)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" \
    http://deb.debian.org/debian >/dev/null
  tar -C "$rootfs" -c . | podman import --quiet - "$base" >/dev/null
  rm -rf "$rootfs"
}

build_image() {
  local mounts=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
  [[ -d /etc/xdg/pip ]] && mounts+=(-v /etc/xdg/pip:/etc/xdg/pip:ro)
  [[ -d /opt/wheels ]] && mounts+=(-v /opt/wheels:/opt/wheels:ro)
  podman build --quiet --format docker --network host "${mounts[@]}" \
    --build-arg BASE_IMAGE="$base" --build-arg TORCH_INDEX_URL=https://pypi.org/simple \
    -f "$root/docker/Dockerfile" -t "$tag" "$root" >/dev/null
}

step "engine (apt)" install_engine
step "base image (debootstrap)" build_base
step "project image" build_image
podman images --format '{{.Repository}}:{{.Tag}}  {{.Size}}' "$base" >&2
podman images --format '{{.Repository}}:{{.Tag}}  {{.Size}}' "$tag" >&2
