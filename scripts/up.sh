#!/usr/bin/env bash
# `make up`: deploy MODEL on this machine, or the offline demo when that cannot work here.
# Deploy = build what is missing, seed MODEL, start SERVICES, wait for health (and, for ComfyUI,
# readiness of WORKFLOWS), print the URLs. Everything else is the compose file's job.
# Environment (from the Makefile): DOCKER, MODEL, SERVICES, WORKFLOWS, DEMO (1 force, 0 never),
# HF_TOKEN_FILE, COMFYUI_SRC, RUNTIME_PORT, COMFYUI_PORT.
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKER=${DOCKER:-docker}
SERVICES=${SERVICES:-runtime comfyui}
compose() { "$DOCKER" compose "$@"; }
env_file_value() { [ -f .env ] && sed -n "s/^$1=//p" .env | tail -1 || true; }
MODEL=${MODEL:-$(env_file_value FLUXSTACK_MANIFEST)}
HF_TOKEN_FILE=${HF_TOKEN_FILE:-$(env_file_value HF_TOKEN_FILE)}
COMPOSE_FILE=${COMPOSE_FILE:-$(env_file_value COMPOSE_FILE)}
GATEWAY_PORT=${GATEWAY_PORT:-$(env_file_value GATEWAY_PORT)}
BIND=$(env_file_value FLUXSTACK_BIND); BIND=${BIND:-127.0.0.1}

# Does manifest $1 (or anything it includes) have gated files, i.e. need a token?
gated() {
  local f="manifests/$1.yaml" inc
  [ -f "$f" ] || return 1
  grep -q "gated: true" "$f" && return 0
  for inc in $(awk '/^include:/ {on = 1; next} /^[a-z]/ {on = 0} on && /^- / {print $2}' "$f"); do
    gated "$inc" && return 0
  done
  return 1
}
has_gpu() { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }

banner() {
  printf '\n%s\n' "================================================================================"
  printf '  %s\n' "$@"
  printf '%s\n\n' "================================================================================"
}

why_demo=""
if [ "${DEMO:-}" = 1 ]; then
  why_demo="DEMO=1 was given"
elif [ "${DEMO:-}" != 0 ]; then
  if [ -z "$MODEL" ]; then
    why_demo="no MODEL given (make up MODEL=flux-dev, or FLUXSTACK_MANIFEST in .env)"
  elif ! has_gpu; then
    why_demo="no NVIDIA GPU here (nvidia-smi -L failed); DEMO=0 deploys $MODEL on CPU anyway"
  elif [ -z "$HF_TOKEN_FILE" ] || [ "$HF_TOKEN_FILE" = /dev/null ] || [ ! -s "$HF_TOKEN_FILE" ]; then
    gated "$MODEL" && why_demo="no Hugging Face token (HF_TOKEN_FILE) and $MODEL has gated files"
  fi
fi

if [ -n "$why_demo" ]; then
  banner "DEMO MODE: $why_demo." \
         "Serving a TINY RANDOM FLUX-architecture model through the stack's own mirror." \
         "Its images are noise: it proves the plumbing (mirror -> seeder -> runtime), not FLUX." \
         "ComfyUI is not started in the demo (its FLUX loader needs full-size models)."
  exec make --no-print-directory demo DOCKER="$DOCKER"
fi

export FLUXSTACK_MANIFEST=$MODEL
[ -n "$HF_TOKEN_FILE" ] && export HF_TOKEN_FILE
# Keep the operator's compose files (the gateway, say) and add the GPU request where a GPU answers.
COMPOSE_FILE=${COMPOSE_FILE:-compose.yaml}
if has_gpu && [[ $COMPOSE_FILE != *gpu* ]]; then
  COMPOSE_FILE=$COMPOSE_FILE:compose/gpu.yaml
fi
export COMPOSE_FILE
if [[ " $SERVICES " == *" comfyui "* ]] && ! "$DOCKER" image inspect "${FLUXSTACK_COMFYUI_IMAGE:-fluxstack/comfyui:dev}" \
     >/dev/null 2>&1 && [ -n "${COMFYUI_SRC:-}" ]; then
  make --no-print-directory image-comfyui DOCKER="$DOCKER" COMFYUI_SRC="$COMFYUI_SRC"
fi

echo "fluxstack: deploying $MODEL ($SERVICES); the seeder runs first, see \`make logs\`"
# shellcheck disable=SC2086  # SERVICES is a word list
if ! compose up -d --wait $SERVICES; then
  echo "fluxstack: the stack did not come up healthy; the seeder says:" >&2
  compose logs --no-log-prefix --tail 15 seeder >&2 || true
  exit 1
fi
if [[ " $SERVICES " == *" comfyui "* ]]; then
  # shellcheck disable=SC2086
  compose run --rm --no-deps -T seeder comfy ready ${WORKFLOWS:-flux-dev-t2i} --url http://comfyui:8188
fi
if [[ $COMPOSE_FILE == *gateway* ]]; then
  base="https://$(hostname -f 2>/dev/null || hostname):${GATEWAY_PORT:-8443}"  # the services are not published
  runtime_url=$base/docs comfyui_url=$base/
else
  runtime_url=http://$BIND:${RUNTIME_PORT:-8000}/docs comfyui_url=http://$BIND:${COMFYUI_PORT:-8188}/
fi
for service in $SERVICES; do
  case $service in
    runtime) echo "runtime (diffusers API): $runtime_url" ;;
    comfyui) echo "ComfyUI: $comfyui_url (workflows: drag workflows/*.ui.json in)" ;;
  esac
done
