#!/usr/bin/env bash
# Docker smoke test: build the CPU image offline, bring the compose stack up, search through it and
# scrape it with Prometheus. Needs root, Debian's docker.io, docker-compose and debootstrap.
#
# No image registry is reachable, so the Debian base image is made here (debootstrap minbase, imported
# under the name the Dockerfile uses) and Prometheus is a stand-in built from Debian's package; the
# image installs only from a wheel folder prepared on this host (deploy/wheelhouse.sh). The daemon
# runs without a bridge or iptables and every container uses the host's network on loopback ports.
# Grafana is not started: its image is not in any registry reachable here (its files are checked by
# tests/deploy/test_deploy_files.py).
set -euo pipefail

repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"
DOCKER=${DOCKER:-/usr/bin/docker}  # Debian's client, matching its daemon
COMPOSE=${COMPOSE:-/usr/bin/docker-compose}
export DOCKER_HOST=${DOCKER_HOST:-unix:///var/run/docker.sock}
work="$(mktemp -d "${TMPDIR:-/tmp}/fashionbert-smoke.XXXXXX")"
project=fashionbert-smoke
started_daemon=""
t0=$SECONDS

log() { echo "[smoke +$((SECONDS - t0))s] $*"; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# docker-compose.yml as is, less its published ports (host networking refuses port bindings, and a
# compose override can add to a list but not empty it), with tests/deploy/compose.hostnet.yml over it.
compose() {
    "$COMPOSE" -p "$project" --project-directory "$repo" \
        -f "$work/docker-compose.yml" -f tests/deploy/compose.hostnet.yml "$@"
}

cleanup() {
    status=$?
    if [ "$status" -ne 0 ] && [ -n "${FASHIONBERT_API_PORT:-}" ]; then
        log "failed; container logs follow"
        compose logs --no-color --tail=80 2>&1 || true
    fi
    compose --profile train down --volumes --remove-orphans >/dev/null 2>&1 || true
    if [ -n "$started_daemon" ]; then
        # Each build re-tags fashionbert-search:smoke and leaves the previous image and its build stage
        # untagged (about 3 GB a run): on the daemon this script started, drop the dangling ones.
        "$DOCKER" image prune -f >/dev/null 2>&1 || true
        log "stopping the Docker daemon"
        kill "$started_daemon" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$started_daemon" 2>/dev/null || break; sleep 0.5; done
    fi
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT

python3 - docker-compose.yml "$work/docker-compose.yml" <<'EOF'
import sys

import yaml

compose = yaml.safe_load(open(sys.argv[1]))
for service in compose["services"].values():
    service.pop("ports", None)
yaml.safe_dump(compose, open(sys.argv[2], "w"), sort_keys=False)
EOF

# 1. The daemon: reuse one that answers, else start Debian's with no bridge and no iptables.
if ! "$DOCKER" info >/dev/null 2>&1; then
    log "starting dockerd (--bridge=none --iptables=false)"
    dockerd --bridge=none --iptables=false --ip-masq=false >"$work/dockerd.log" 2>&1 &
    started_daemon=$!
    for _ in $(seq 120); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 0.5; done
    "$DOCKER" info >/dev/null 2>&1 || { cat "$work/dockerd.log"; echo "dockerd did not start" >&2; exit 1; }
fi

# 2. The base image, made locally when missing.
if ! "$DOCKER" image inspect debian:bookworm-slim >/dev/null 2>&1; then
    log "debootstrap --variant=minbase bookworm"
    debootstrap --variant=minbase bookworm "$work/rootfs" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log"; exit 1; }
    rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/*
    tar -C "$work/rootfs" -c . | "$DOCKER" import --change 'CMD ["bash"]' - debian:bookworm-slim >/dev/null
    rm -rf "$work/rootfs"
fi

# 3. The wheel folder on the host, then the image from it alone (pip --no-index inside).
log "wheel folder (.whl)"
deploy/wheelhouse.sh .whl
log "docker build (CPU, offline from .whl)"
build_start=$SECONDS
"$DOCKER" build --network host --build-arg WHEELS=.whl -t fashionbert-search:smoke . >"$work/build.log" 2>&1 \
    || { tail -40 "$work/build.log"; exit 1; }
log "image built in $((SECONDS - build_start))s: $("$DOCKER" image inspect -f '{{.Size}}' fashionbert-search:smoke | awk '{printf "%.0f MB", $1 / 1e6}')"
if ! "$DOCKER" image inspect prom/prometheus:v2.53.0 >/dev/null 2>&1; then
    log "Prometheus stand-in image (Debian's prometheus package)"
    "$DOCKER" build --network host -t prom/prometheus:v2.53.0 -f tests/deploy/prometheus.Dockerfile tests/deploy \
        >"$work/prometheus-build.log" 2>&1 || { tail -40 "$work/prometheus-build.log"; exit 1; }
fi

# 4. A small generated catalogue, and the settings the compose file reads.
python3 -m app.cli synthetic --out "$work/data" --items 48 >/dev/null
chmod -R a+rX "$work"  # the containers' non-root user reads it
export FASHIONBERT_IMAGE_TAG=smoke
export FASHIONBERT_DATA_DIR="$work/data"
export FASHIONBERT_DATA_SPEC=jsonl:/data/catalogue.jsonl
export FASHIONBERT_TRAIN_ARGS="--tiny --steps 6 --validate-every 3 --batch-size 8"
export FASHIONBERT_ADMIN_API_KEY=smoke-admin-key
FASHIONBERT_API_PORT=$(free_port)
PROMETHEUS_PORT=$(free_port)
export FASHIONBERT_API_PORT PROMETHEUS_PORT
export SMOKE_PROMETHEUS_CONFIG="$work/prometheus.yml"
cat >"$SMOKE_PROMETHEUS_CONFIG" <<EOF
global:
  scrape_interval: 2s
scrape_configs:
  - job_name: fashionbert
    static_configs:
      - targets: ["127.0.0.1:$FASHIONBERT_API_PORT"]
EOF
api="http://127.0.0.1:$FASHIONBERT_API_PORT"
prometheus="http://127.0.0.1:$PROMETHEUS_PORT"

# 5. Train (the opt-in profile), then up: the indexer runs to completion before the api starts.
log "compose: train (tiny) into the model volume"
compose --profile train run --rm train >"$work/train.log" 2>&1 || { tail -40 "$work/train.log"; exit 1; }
log "compose up api prometheus (indexer first)"
compose up -d --no-build api prometheus
indexer_status=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$(compose ps -q indexer)")
[ "$indexer_status" = 0 ] || { echo "indexer exited with $indexer_status" >&2; exit 1; }

api_container=$(compose ps -q api)
log "waiting for the api's healthcheck (/readyz)"
for _ in $(seq 200); do
    health=$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$api_container")
    [ "$health" = healthy ] && break
    [ "$("$DOCKER" inspect -f '{{.State.Running}}' "$api_container")" = true ] || { echo "api exited" >&2; exit 1; }
    sleep 1.5
done
[ "$health" = healthy ] || { echo "api not healthy: $health" >&2; exit 1; }
[ "$("$DOCKER" exec "$api_container" id -u)" != 0 ] || { echo "the api runs as root" >&2; exit 1; }

# 6. Search through it: text, image, a result photo, the demo page, a reload.
log "searching"
curl -fsS "$api/readyz" >/dev/null
curl -fsS -X POST "$api/search/text" -H 'Content-Type: application/json' \
    -d '{"query": "red striped t-shirt", "k": 5}' >"$work/text.json"
curl -fsS -X POST "$api/search/image?k=5" -F "file=@$work/data/images/000001.png" >"$work/image.json"
photo=$(python3 - "$work/text.json" "$work/image.json" <<'EOF'
import json, sys
for path in sys.argv[1:]:
    body = json.load(open(path))
    assert len(body["results"]) == 5, body
    assert set(body["timings"]) == {"encode", "recall", "rerank"}, body
print(body["results"][0]["image_url"])
EOF
)
curl -fsS "$api$photo" -o "$work/photo.png" && python3 -c "from PIL import Image; Image.open('$work/photo.png').verify()"
curl -fsS "$api/" | grep -q 'id="drop-zone"'
curl -fsS -X POST "$api/admin/reload" -H "X-API-Key: $FASHIONBERT_ADMIN_API_KEY" >/dev/null

# 7. Prometheus scraped the api: the searches above show in its counters.
log "querying Prometheus"
query='sum(fashionbert_requests_total{endpoint=~"/search/.*"})'
for _ in $(seq 60); do
    value=$(curl -fsS --get "$prometheus/api/v1/query" --data-urlencode "query=$query" \
        | python3 -c 'import json, sys; r = json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else 0)' \
        2>/dev/null || echo 0)
    [ "${value%.*}" -ge 2 ] 2>/dev/null && break
    sleep 1
done
[ "${value%.*}" -ge 2 ] || { echo "Prometheus did not see the searches (got $value)" >&2; exit 1; }
up=$(curl -fsS --get "$prometheus/api/v1/query" --data-urlencode 'query=up{job="fashionbert"}' \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["data"]["result"][0]["value"][1])')
[ "$up" = 1 ] || { echo "Prometheus target down" >&2; exit 1; }

log "passed: image built, stack up, searched, reloaded and scraped (${value%.*} searches counted)"
