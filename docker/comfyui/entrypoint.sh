#!/bin/sh
# Start ComfyUI on the read-only store; --cpu when no NVIDIA GPU was passed in (or FLUXSTACK_COMFY_CPU=1).
# COMFYUI_ARGS adds ComfyUI flags (e.g. "--fast --cache-none"), word-split on purpose.
set -eu
device=""
if [ "${FLUXSTACK_COMFY_CPU:-0}" = "1" ] || ! ls /dev/nvidia0 >/dev/null 2>&1; then
  device="--cpu"
fi
mkdir -p /data/output /data/input /data/user /data/temp
exec python3 /opt/comfyui/main.py --listen 0.0.0.0 --port 8188 --disable-auto-launch \
  --extra-model-paths-config /opt/fluxstack/extra_model_paths.yaml \
  --output-directory /data/output --input-directory /data/input --user-directory /data/user \
  --temp-directory /data/temp --database-url sqlite:////data/user/comfyui.db $device ${COMFYUI_ARGS:-} "$@"
