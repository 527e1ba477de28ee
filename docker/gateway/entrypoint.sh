#!/bin/sh
# fluxstack gateway start-up: reads the tokens and certificates (compose secrets), writes the
# nginx pieces that depend on them into a private tmpfs folder, then runs nginx in the foreground.
#   fluxstack-gateway serve    start (the default)
#   fluxstack-gateway health   exit 0 when /healthz answers (the Docker HEALTHCHECK)
# Settings (environment): GATEWAY_HOSTNAMES, GATEWAY_MAX_BODY, GATEWAY_GEN_RATE, GATEWAY_GEN_BURST,
# GATEWAY_GEN_TIMEOUT, GATEWAY_SESSION_HOURS, RUNTIME_UPSTREAM, COMFYUI_UPSTREAM, GATEWAY_RESOLVER.
set -eu

TOKENS=${GATEWAY_TOKENS_FILE:-/run/secrets/gateway_tokens}
CERT=${GATEWAY_TLS_CERT_FILE:-/run/secrets/gateway_tls_cert}
KEY=${GATEWAY_TLS_KEY_FILE:-/run/secrets/gateway_tls_key}
STATE=/var/lib/fluxstack-gateway
GEN=/tmp/fluxstack-gateway

say() { echo "gateway: $*" >&2; }
die() { say "error: $*"; exit 2; }

if [ "${1:-serve}" = "health" ]; then
  printf 'GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n' \
    | timeout 3 openssl s_client -quiet -connect 127.0.0.1:8443 2>/dev/null | head -1 | grep -q ' 200 '
  exit
fi
[ "${1:-serve}" = "serve" ] || die "usage: $0 serve | health"

umask 077
rm -rf "$GEN" && mkdir -p "$GEN"
[ -w "$STATE" ] || die "$STATE is not writable by uid $(id -u) (mount a volume there)"

# --- tokens: one per line; blank lines and '# comments' ignored. Never echoed, not even on error.
[ -e "$TOKENS" ] || die "no token file at $TOKENS: give the compose secret gateway_tokens (GATEWAY_TOKENS_FILE on the host)"
# Compose bind-mounts file secrets with their host owner and mode: the host file must belong to
# this uid (mode 0400 or 0600), which also keeps it from every other local user.
[ -r "$TOKENS" ] || die "cannot read the token file as uid $(id -u): on the host, chown $(id -u) GATEWAY_TOKENS_FILE and chmod 0400 it"
# A random key, kept in the state volume, turns each token into its session-cookie value: a stolen
# cookie is not the token, and rotating a token ends its browser sessions.
if [ ! -s "$STATE/session.key" ]; then
  openssl rand -hex 32 > "$STATE/session.key.tmp" && mv "$STATE/session.key.tmp" "$STATE/session.key"
fi
session_key=$(cat "$STATE/session.key")
bearer="$GEN/bearer.map"; cookie="$GEN/cookie.map"; session="$GEN/session.map"
: > "$bearer"; : > "$cookie"; : > "$session"
n=0; line=0
while IFS= read -r tok || [ -n "$tok" ]; do
  line=$((line + 1))
  tok=$(printf '%s' "$tok" | tr -d '\r' | sed 's/^[[:space:]]*//; s/[[:space:]]*$//')
  case "$tok" in ''|'#'*) continue ;; esac
  # Only characters that need no quoting in nginx's config, and long enough not to be guessed.
  if ! printf '%s' "$tok" | grep -Eq '^[A-Za-z0-9._~+/=-]{24,512}$'; then
    die "token on line $line of the token file is not 24..512 characters of [A-Za-z0-9._~+/=-] (generate one: openssl rand -hex 32)"
  fi
  value=$(printf '%s' "$tok" | openssl dgst -sha256 -mac HMAC -macopt "hexkey:$session_key" | sed 's/^.*= *//')
  printf '"Bearer %s" 1;\n' "$tok" >> "$bearer"
  printf '"Bearer %s" "%s";\n' "$tok" "$value" >> "$session"
  printf '"%s" 1;\n' "$value" >> "$cookie"
  n=$((n + 1))
done < "$TOKENS"
[ "$n" -gt 0 ] || die "the token file $TOKENS holds no token; every route but /healthz would be closed"

# --- TLS: the operator's pair, else a self-signed CA and a server certificate signed by it, made
# once and kept in the state volume (trust ca.pem on clients; see docs/gateway.md).
hostnames=${GATEWAY_HOSTNAMES:-localhost,127.0.0.1}
if [ -s "$CERT" ] && [ -s "$KEY" ]; then
  cp "$CERT" "$GEN/cert.pem"; cp "$KEY" "$GEN/key.pem"
  say "TLS: operator certificate $(openssl x509 -in "$GEN/cert.pem" -noout -subject)"
else
  tls="$STATE/tls"; mkdir -p "$tls"
  if [ ! -s "$tls/cert.pem" ] || [ "$(cat "$tls/hostnames" 2>/dev/null)" != "$hostnames" ]; then
    san=""
    for h in $(printf '%s' "$hostnames" | tr ',' ' '); do
      if printf '%s' "$h" | grep -Eq '^[0-9.]+$|:'; then san="$san,IP:$h"; else san="$san,DNS:$h"; fi
    done
    san=${san#,}
    if [ ! -s "$tls/ca.pem" ]; then
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
        -subj "/CN=fluxstack gateway CA $(hostname)" -keyout "$tls/ca-key.pem" -out "$tls/ca.pem" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        2>/dev/null
    fi
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=${hostnames%%,*}" \
      -keyout "$tls/key.pem" -out "$tls/cert.csr" 2>/dev/null
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n' \
      "$san" > "$tls/ext.cnf"
    openssl x509 -req -in "$tls/cert.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca-key.pem" -CAcreateserial \
      -days 825 -extfile "$tls/ext.cnf" -out "$tls/cert.pem" 2>/dev/null
    printf '%s' "$hostnames" > "$tls/hostnames"
    rm -f "$tls/cert.csr" "$tls/ext.cnf"
    say "TLS: generated a self-signed CA and a certificate for $hostnames"
  fi
  cat "$tls/cert.pem" "$tls/ca.pem" > "$GEN/cert.pem"; cp "$tls/key.pem" "$GEN/key.pem"
  say "TLS: self-signed; trust the CA (docker compose exec gateway cat $tls/ca.pem), sha256 fingerprint" \
      "$(openssl x509 -in "$tls/ca.pem" -noout -fingerprint -sha256 | sed 's/^.*=//')"
fi

# --- settings
max_body=${GATEWAY_MAX_BODY:-50m}
rate=${GATEWAY_GEN_RATE:-20r/m}
burst=${GATEWAY_GEN_BURST:-10}
gen_timeout=${GATEWAY_GEN_TIMEOUT:-3600s}
hours=${GATEWAY_SESSION_HOURS:-12}
resolver=${GATEWAY_RESOLVER:-127.0.0.11}
for v in "$max_body" "$rate" "$burst" "$gen_timeout" "$hours" "$resolver" \
         "${RUNTIME_UPSTREAM:-runtime:8000}" "${COMFYUI_UPSTREAM:-comfyui:8188}"; do
  printf '%s' "$v" | grep -Eq '^[A-Za-z0-9./:_-]+$' || die "setting '$v' has characters nginx would misread"
done
cat > "$GEN/http.conf" <<CONF
resolver $resolver valid=10s ipv6=off;
# Map keys hold whole tokens (up to 512 characters).
map_hash_bucket_size 1024;
client_max_body_size $max_body;
limit_req_zone \$binary_remote_addr zone=fx_gen:10m rate=$rate;
limit_req_status 429;
map \$host \$fx_runtime { default "http://${RUNTIME_UPSTREAM:-runtime:8000}"; }
map \$host \$fx_comfyui { default "http://${COMFYUI_UPSTREAM:-comfyui:8188}"; }
map \$http_authorization \$fx_bearer { default 0; include $bearer; }
map \$http_authorization \$fx_session { default ""; include $session; }
map \$cookie_fluxstack_session \$fx_cookie { default 0; include $cookie; }
CONF
# Generations can run for many minutes: no proxy timeout cuts them before GATEWAY_GEN_TIMEOUT.
cat > "$GEN/generation.conf" <<CONF
limit_req zone=fx_gen burst=$burst nodelay;
proxy_read_timeout $gen_timeout;
proxy_send_timeout $gen_timeout;
CONF
printf 'add_header Set-Cookie "fluxstack_session=$fx_session; Path=/; Max-Age=%s; Secure; HttpOnly; SameSite=Strict" always;\n' \
  "$((hours * 3600))" > "$GEN/session-cookie.conf"

nginx -e stderr -t -q -c /etc/fluxstack-gateway/nginx.conf
say "serving https on :8443 with $n token(s); runtime ${RUNTIME_UPSTREAM:-runtime:8000}, ComfyUI ${COMFYUI_UPSTREAM:-comfyui:8188}"
exec nginx -e stderr -c /etc/fluxstack-gateway/nginx.conf -g 'daemon off;'
