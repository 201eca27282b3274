#!/usr/bin/env bash
# vt-serve's resident memory after SIGHUP reloads under load: six clients post photos to
# /predict while the checkpoint is reloaded every 5 s, twelve times (bench/RESULTS.md,
# session 31). Usage, from the workspace root after `cargo build`:
#   tools/serve/reload_rss.sh [VT_SERVE] [VT_TRAIN] [PHOTOS_DIR]
set -euo pipefail
serve=${1:-target/debug/vt-serve}
train=${2:-target/debug/vt-train}
photos=${3:-../shared/data/intel-sample/seg_pred}
port=41290
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
"$train" init --arch vt-resnet18 --image-size 32 --num-classes 6 --out "$work/ckpt" > /dev/null 2>&1
RUST_LOG=warn "$serve" --checkpoint "$work/ckpt" --port $port --threads 1 > "$work/serve.log" 2>&1 &
server=$!
until curl -sf "http://127.0.0.1:$port/health/ready" > /dev/null; do sleep 0.2; done
rss() { awk '/VmRSS/ {print $2 / 1024 " MiB"}' "/proc/$server/status"; }
echo "after start: $(rss)"
mapfile -t images < <(find "$photos" -name '*.jpg' | sort | head -40)
client() {
    while [ ! -e "$work/stop" ]; do
        curl -s -o /dev/null --data-binary "@${images[RANDOM % ${#images[@]}]}" \
            -H 'Content-Type: image/jpeg' "http://127.0.0.1:$port/predict"
    done
}
for _ in 1 2 3 4 5 6; do client & done
for _ in $(seq 12); do sleep 5; kill -HUP $server; done
touch "$work/stop"
sleep 3
echo "after 12 reloads under load: $(rss)"
