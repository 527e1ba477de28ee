#!/usr/bin/env bash
# Build a base image locally, under the name the Dockerfiles and test hosts use, for sites that
# cannot pull from a registry. Needs root and debootstrap. SUITE picks the release:
#   Debian: trixie (default) -> debian:trixie-slim, bookworm -> debian:bookworm-slim
#   Ubuntu: jammy -> ubuntu:22.04, noble -> ubuntu:24.04 (main, restricted, universe, multiverse;
#           release, -updates, -backports and -security, as the registry's images have them)
# The mirrors are overridable:
#   DEBIAN_MIRROR=http://mirror.example/debian scripts/build-base-image.sh
#   SUITE=noble UBUNTU_MIRROR=http://mirror.example/ubuntu UBUNTU_SECURITY_MIRROR=… scripts/build-base-image.sh
# Ubuntu's archive key is not packaged on Debian: UBUNTU_KEYRING=path uses yours; otherwise the
# ubuntu-keyring .deb is fetched from the mirror and checked against the sha256 pinned below.
set -euo pipefail
suite=${SUITE:-trixie}
docker=${DOCKER:-docker}
case "$suite" in
  jammy|noble)
    distro=ubuntu
    declare -A ubuntu_version=([jammy]=22.04 [noble]=24.04)
    name=${BASE_IMAGE:-ubuntu:${ubuntu_version[$suite]}}
    mirror=${UBUNTU_MIRROR:-http://archive.ubuntu.com/ubuntu}
    security_mirror=${UBUNTU_SECURITY_MIRROR:-http://security.ubuntu.com/ubuntu}
    ;;
  *)
    distro=debian
    name=${BASE_IMAGE:-debian:${suite}-slim}
    mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
    ;;
esac
# The keyring that verifies Ubuntu's Release files (noble's package; it covers every release).
keyring_deb=pool/main/u/ubuntu-keyring/ubuntu-keyring_2023.11.28.1_all.deb
keyring_sha256=36de43b15853ccae0028e9a767613770c704833f82586f28eb262f0311adb8a8

if "$docker" image inspect "$name" >/dev/null 2>&1 && [ -z "${FORCE:-}" ]; then
  echo "base image $name already present (FORCE=1 to rebuild)"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 2; }
root=$(mktemp -d /tmp/fluxstack-rootfs.XXXXXX)
work=$(mktemp -d /tmp/fluxstack-keyring.XXXXXX)
trap 'rm -rf "$root" "$work"' EXIT

args=(--variant=minbase "$suite" "$root" "$mirror")
if [ "$distro" = ubuntu ]; then
  keyring=${UBUNTU_KEYRING:-}
  if [ -z "$keyring" ]; then
    curl -fsS -o "$work/keyring.deb" "$mirror/$keyring_deb"
    echo "$keyring_sha256  $work/keyring.deb" | sha256sum -c --quiet - \
      || { echo "ubuntu-keyring from $mirror does not match the pinned sha256" >&2; exit 2; }
    dpkg-deb -x "$work/keyring.deb" "$work/x"
    keyring=$work/x/usr/share/keyrings/ubuntu-archive-keyring.gpg
  fi
  args=(--keyring="$keyring" "${args[@]}")
  # Older debootstraps have no script for newer releases; gutsy is the one every Ubuntu release uses.
  [ -e "/usr/share/debootstrap/scripts/$suite" ] || args+=(/usr/share/debootstrap/scripts/gutsy)
fi
debootstrap "${args[@]}" >/dev/null

if [ "$distro" = ubuntu ]; then
  # debootstrap writes only "<suite> main"; the registry's images have every component and pocket
  # (docker.io and docker-compose-v2 are in universe, compose v2 of jammy only in -updates).
  : > "$root/etc/apt/sources.list"
  cat > "$root/etc/apt/sources.list.d/ubuntu.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $suite $suite-updates $suite-backports
Components: main restricted universe multiverse
Signed-By: /usr/share/keyrings/ubuntu-archive-keyring.gpg

Types: deb
URIs: $security_mirror
Suites: $suite-security
Components: main restricted universe multiverse
Signed-By: /usr/share/keyrings/ubuntu-archive-keyring.gpg
EOF
fi
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
tar -C "$root" -c . | "$docker" import - "$name" >/dev/null
echo "built $name from $mirror ($suite, minbase)"
