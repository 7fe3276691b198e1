#!/usr/bin/env bash
# The real container, tested for real (`make container-test`; minutes and gigabytes, so not part of `make test`):
# build the image, `compose up` with the monitoring profile on free ports, wait for the api to be healthy,
# /predict a real photo, HUP, retrain while serving (the model watch reloads), check that Prometheus scraped the api and loaded the alert rules (all healthy), stop the
# api with SIGTERM (exit status 0), and tear everything down, volumes included. Needs a Docker engine; on the
# project's offline machines OFFLINE_DOCKER (../shared/tools/offline-docker.sh) provides one with local stand-ins
# for the base images.
set -euo pipefail
cd "$(dirname "$0")/.."

PROJECT=${PROJECT:-petclf-container-test}
IMAGE=pet-classifier:latest
PHOTO=tests/data/chelsea.jpg
TRAIN_ARGS=${TRAIN_ARGS:---epochs 3}  # the container is under test, not the model: a short demo training
say() { echo "container-test: $*"; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# The api container's log lines containing $1 (grep -c reads the whole log: `grep -q` would exit at the first
# match, and docker logs, cut off mid-write, would fail the pipeline under pipefail).
api_log_count() { docker logs "$api" 2>&1 | grep -c -- "$1" || true; }

if [ -n "${OFFLINE_DOCKER:-}" ] && [ -x "$OFFLINE_DOCKER" ]; then
    "$OFFLINE_DOCKER"
fi
# Compose v2 (`docker compose`, what users type); Compose 1.29 only where v2 is missing.
if docker compose version >/dev/null 2>&1; then compose=(docker compose); else compose=(docker-compose); fi
say "using $("${compose[@]}" version --short 2>/dev/null || "${compose[@]}" version | head -n 1)"
API_PORT=$(free_port)
PROMETHEUS_PORT=$(free_port)
TRAIN_DATA_DIR=$(mktemp -d)  # empty: the train service makes its demo data, whatever ./data holds here
chmod 755 "$TRAIN_DATA_DIR"
export API_PORT PROMETHEUS_PORT TRAIN_ARGS TRAIN_DATA_DIR
dc() { "${compose[@]}" -p "$PROJECT" --profile monitoring "$@"; }
cleanup() {
    status=$?
    if [ "$status" -ne 0 ]; then dc logs --tail 60 || true; fi
    say "tearing down (containers, network, volumes)"
    dc down --volumes --remove-orphans >/dev/null 2>&1 || true
    rmdir "$TRAIN_DATA_DIR" 2>/dev/null || true
    exit "$status"
}
trap cleanup EXIT

started=$(date +%s)
say "building $IMAGE (DOCKER_BUILDKIT=0)"
DOCKER_BUILDKIT=0 docker build -q -t "$IMAGE" . >/dev/null
say "image $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.1f GB", $1 / 1e9}'), built in $(($(date +%s) - started)) s"

say "compose up (api on :$API_PORT, prometheus on :$PROMETHEUS_PORT; train runs first)"
dc up -d --no-build
api=$(dc ps -q api)
for _ in $(seq 600); do
    health=$(docker inspect -f '{{.State.Health.Status}}' "$api")
    [ "$health" = healthy ] && break
    [ "$(docker inspect -f '{{.State.Status}}' "$api")" = exited ] && { say "api exited"; exit 1; }
    sleep 2
done
[ "$health" = healthy ] || { say "api not healthy after 20 minutes ($health)"; exit 1; }
say "api healthy after $(($(date +%s) - started)) s in all"

answer=$(curl -sS --fail -F "image=@$PHOTO" "http://127.0.0.1:$API_PORT/predict")
python3 -c 'import json, sys; r = json.loads(sys.argv[1]); print("container-test: /predict ->", r["predicted_class"], r["confidence"], r["model_version"])' "$answer"

# The train service wrote the bundle's ONNX Runtime graphs: BACKEND=auto timed ONNX Runtime against PyTorch at
# start-up and serves the faster on this machine (docs/runtimes.md).
served=$(curl -sS --fail "http://127.0.0.1:$API_PORT/model" | python3 -c '
import json, sys
member = json.load(sys.stdin)["members"][0]
trial = member["measured"] or {}
if set(trial.get("candidates", {})) != {"onnxruntime", "torch"} or trial["backend"] != member["backend"]:
    sys.exit("no start-up trial of both runtimes: " + member["reason"])
print(member["backend"], "(" + member["reason"] + ")")') || { say "the api did not time both runtimes: $served"; exit 1; }
say "served by $served"

say "reloading: kill -HUP to gunicorn's master (PID 1 in the container)"
docker kill --signal HUP "$api" >/dev/null
for _ in $(seq 90); do [ "$(api_log_count "generation 2 is ready")" -gt 0 ] && break; sleep 2; done
[ "$(api_log_count "generation 2 is ready")" -gt 0 ] || { say "the reload never completed"; exit 1; }
curl -sS --fail -o /dev/null -F "image=@$PHOTO" "http://127.0.0.1:$API_PORT/predict"
say "reloaded: generation 2 serves"

# The documented retrain while serving (docs/deployment.md): the train service renames a new bundle into the
# volume, the api's model watch reloads it, with no HUP and no restart; the new version serves.
before=$(curl -sS --fail "http://127.0.0.1:$API_PORT/model" | python3 -c 'import json, sys; print(json.load(sys.stdin)["version"])')
say "retraining while serving: compose run --rm -e RETRAIN=true train (api serves $before)"
dc run --rm -e RETRAIN=true -e TRAIN_ARGS="--epochs 1" train >/dev/null
for _ in $(seq 90); do
    now=$(curl -sS "http://127.0.0.1:$API_PORT/model" | python3 -c 'import json, sys; print(json.load(sys.stdin)["version"])' || true)
    [ -n "$now" ] && [ "$now" != "$before" ] && break
    sleep 2
done
[ "$now" != "$before" ] || { say "the api still serves $before after the retrain"; exit 1; }
[ "$(api_log_count "model watch: /models/pet_classifier.pt replaced")" -gt 0 ] || { say "no model-watch reload"; exit 1; }
[ "$(docker inspect -f '{{.RestartCount}}' "$api")" = 0 ] || { say "the api restarted"; exit 1; }
curl -sS --fail -o /dev/null -F "image=@$PHOTO" "http://127.0.0.1:$API_PORT/predict"
say "the model watch reloaded: $now serves, no restart"

query="http://127.0.0.1:$PROMETHEUS_PORT/api/v1/query?query=petclf_model_info"
for _ in $(seq 60); do
    scraped=$(curl -sS "$query" | python3 -c 'import json, sys; print(len(json.load(sys.stdin)["data"]["result"]))' || echo 0)
    [ "$scraped" -gt 0 ] && break
    sleep 2
done
[ "$scraped" -gt 0 ] || { say "prometheus never scraped petclf_model_info from the api"; exit 1; }
say "prometheus scraped the api: $(curl -sS "http://127.0.0.1:$PROMETHEUS_PORT/api/v1/query?query=up" | python3 -c 'import json, sys; print([(r["metric"]["instance"], r["value"][1]) for r in json.load(sys.stdin)["data"]["result"]])')"

# The alert rules are loaded and every one evaluates healthy (the drift group evaluates once a minute).
expected=$(grep -cE '^ +- (record|alert):' deploy/prometheus/rules.yml)
rules_state() {
    curl -sS "http://127.0.0.1:$PROMETHEUS_PORT/api/v1/rules" | python3 -c '
import json, sys
rules = [r for g in json.load(sys.stdin)["data"]["groups"] for r in g["rules"]]
print(len(rules), sum(r["health"] == "ok" for r in rules))' || echo "0 0"
}
for _ in $(seq 60); do
    read -r loaded healthy <<<"$(rules_state)"
    [ "$loaded" = "$expected" ] && [ "$healthy" = "$expected" ] && break
    sleep 2
done
[ "$loaded" = "$expected" ] && [ "$healthy" = "$expected" ] \
    || { say "prometheus lists $loaded of $expected rules, $healthy healthy"; exit 1; }
say "prometheus loaded all $expected rules (deploy/prometheus/rules.yml), all healthy"

say "stopping the api with SIGTERM"
docker stop --time 60 "$api" >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' "$api")
# Two drains: the old worker's at the reload, then the new one's on SIGTERM.
[ "$(api_log_count "app.service: draining:")" -ge 2 ] || { say "no drain on SIGTERM in the api's log"; exit 1; }
[ "$code" = 0 ] || { say "api exited with $code after SIGTERM"; exit 1; }
say "api drained and exited 0"
say "PASSED in $(($(date +%s) - started)) s"
