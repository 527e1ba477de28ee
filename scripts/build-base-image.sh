#!/usr/bin/env bash
# Build the Debian base image locally, under the name the Dockerfiles use (debian:trixie-slim),
# for sites that cannot pull from a registry. Needs root and debootstrap; the Debian mirror is
# overridable: DEBIAN_MIRROR=http://mirror.example/debian scripts/build-base-image.sh
set -euo pipefail
suite=${SUITE:-trixie}
name=${BASE_IMAGE:-debian:${suite}-slim}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
docker=${DOCKER:-docker}

if "$docker" image inspect "$name" >/dev/null 2>&1 && [ -z "${FORCE:-}" ]; then
  echo "base image $name already present (FORCE=1 to rebuild)"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 2; }
root=$(mktemp -d /tmp/fluxstack-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase "$suite" "$root" "$mirror" >/dev/null
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
tar -C "$root" -c . | "$docker" import - "$name" >/dev/null
echo "built $name from $mirror ($suite, minbase)"
