#!/bin/sh
# The Python environment both images share, one place for it:
#   python-env.sh base          Debian's python3 in a venv at $VIRTUAL_ENV, a C compiler for Triton,
#                               and the service user
#   python-env.sh install LOCK  every wheel of LOCK by sha256 from $PIP_INDEX_URL, then pip removed
# A proxy's CA bundle comes as the BuildKit secret `ca` (/run/secrets/ca), never stored in a layer.
set -eu
case "${1:-}" in
  base)
    apt-get update
    # gcc, libc6-dev, python3-dev: the first time Triton runs on a GPU (torch.compile: the runtime's
    # performance modes, ComfyUI's TorchCompileModel) it builds its kernel launcher with a C compiler
    # against Python's headers; without them every compiled mode fails at warm-up.
    apt-get install -y --no-install-recommends python3 python3-venv ca-certificates gcc libc6-dev python3-dev
    rm -rf /var/lib/apt/lists/*
    python3 -m venv "$VIRTUAL_ENV"
    groupadd --gid "$FLUXSTACK_GID" fluxstack
    useradd --uid "$FLUXSTACK_UID" --gid "$FLUXSTACK_GID" --no-create-home --home-dir /tmp \
      --shell /usr/sbin/nologin fluxstack
    ;;
  install)
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi
    pip install --no-cache-dir --require-hashes --only-binary=:all: --index-url "$PIP_INDEX_URL" -r "$2"
    pip uninstall -y pip
    ;;
  *)
    echo "usage: $0 base | install LOCKFILE" >&2
    exit 2
    ;;
esac
