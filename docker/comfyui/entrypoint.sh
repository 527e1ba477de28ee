#!/bin/sh
# Start ComfyUI on the read-only store; --cpu when no NVIDIA GPU was passed in (or FLUXSTACK_COMFY_CPU=1).
# COMFYUI_ARGS adds ComfyUI flags (e.g. "--fast --cache-none"), word-split on purpose.
set -eu
device=""
if [ "${FLUXSTACK_COMFY_CPU:-0}" = "1" ] || ! ls /dev/nvidia0 >/dev/null 2>&1; then
  device="--cpu"
fi
mkdir -p /data/output /data/input /data/user /data/temp

# Outputs are pruned so a busy host cannot fill its disk: every COMFYUI_PRUNE_INTERVAL seconds,
# files older than COMFYUI_OUTPUT_MAX_AGE_DAYS go, then the oldest until the folder is under
# COMFYUI_OUTPUT_MAX_MB. 0 turns either rule off. Copy results you keep elsewhere (comfy run does).
prune_outputs() {
  days=${COMFYUI_OUTPUT_MAX_AGE_DAYS:-30}; cap=${COMFYUI_OUTPUT_MAX_MB:-20480}
  if [ "$days" -gt 0 ]; then
    find /data/output -type f -mmin +"$((days * 1440))" -print -delete | sed 's/^/comfyui outputs: pruned (age) /'
  fi
  if [ "$cap" -gt 0 ]; then
    find /data/output -type f -printf '%T@ %s %p\n' | sort -rn | awk -v cap="$((cap * 1048576))" \
      '{ total += $2; if (total > cap) { sub(/^[^ ]+ [^ ]+ /, ""); print } }' | while IFS= read -r f; do
        rm -f -- "$f" && echo "comfyui outputs: pruned (over ${cap} MB) $f"
      done
  fi
}
if [ "${COMFYUI_OUTPUT_MAX_AGE_DAYS:-30}" != 0 ] || [ "${COMFYUI_OUTPUT_MAX_MB:-20480}" != 0 ]; then
  (while :; do prune_outputs || true; sleep "${COMFYUI_PRUNE_INTERVAL:-600}"; done) &
fi

exec python3 /opt/comfyui/main.py --listen 0.0.0.0 --port 8188 --disable-auto-launch \
  --extra-model-paths-config /opt/fluxstack/extra_model_paths.yaml \
  --output-directory /data/output --input-directory /data/input --user-directory /data/user \
  --temp-directory /data/temp --database-url sqlite:////data/user/comfyui.db $device ${COMFYUI_ARGS:-} "$@"
