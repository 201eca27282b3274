#!/usr/bin/env bash
# The GPU check (issue #6): prepared on the build machine, run once on an NVIDIA machine.
#
#   bench/gpu.sh prepare      # here: CUDA builds of vt-train, vt-serve and xtask, stripped and
#                             # xz-compressed, plus a subset of the intel-sample photos, into
#                             # target/gpu (under the 64 MiB the device tool carries)
#   bench/gpu.sh run [OUT]    # there, from the repository root: results into OUT
#                             # (default gpu-results/), a summary on stdout
#
# `run` (1) imports the photos with `xtask fetch-data`; (2) trains vt-resnet18 for a few epochs
# on them; (3) scores the same checkpoint on CPU and GPU with `vt-serve predict` and fails when
# a probability differs by more than 1e-3 (bf16 differences are reported); (4) measures
# training img/s (vt-resnet18 and vt-resnet34, 224 px, batch 128) and inference img/s (batch 1
# and 256, f32 and bf16) with `xtask bench model`, PyTorch (python3, tools/reference) on the
# same GPU in the same call; (5) times one end-to-end training epoch with the notebook's
# augmentation from JPEG files (224 px, batch 128) against PyTorch's DataLoader.
#
# Environment: VT_GPU_DEVICE (default cuda; `cpu` runs every step on the CPU with tiny sizes,
# which is how this script is tested without a GPU), VT_PYTHON (default python3),
# VT_GPU_PER_CLASS (photos per class that `prepare` copies, default 100).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
device=${VT_GPU_DEVICE:-cuda}
python=${VT_PYTHON:-python3}
gpu_dir=target/gpu
binaries=(vt-train vt-serve xtask)

prepare() {
    local per_class=${VT_GPU_PER_CLASS:-100}
    local photos=../shared/data/intel-sample
    [ -d "$photos/seg_train" ] || { echo "no photos at $photos (see its README)" >&2; exit 1; }
    local features=()
    if [ "$device" != cpu ]; then
        # shellcheck disable=SC1090
        eval "$(../shared/gpu/cuda-toolchain.sh)"
        features=(--features vt-train/cuda,vt-serve/cuda,xtask/cuda)
    fi
    cargo build -p vt-train -p vt-serve -p xtask "${features[@]}"
    rm -rf "$gpu_dir.tmp"
    mkdir -p "$gpu_dir.tmp/bin" "$gpu_dir.tmp/photos/seg_pred"
    for b in "${binaries[@]}"; do
        strip -o "$gpu_dir.tmp/bin/$b" "target/debug/$b"
        xz -T0 -6 "$gpu_dir.tmp/bin/$b"
    done
    local files
    for class_dir in "$photos"/seg_train/*/; do
        local class
        class=$(basename "$class_dir")
        mkdir -p "$gpu_dir.tmp/photos/seg_train/$class"
        mapfile -t files < <(find "$class_dir" -type f | sort)
        cp -t "$gpu_dir.tmp/photos/seg_train/$class" "${files[@]:0:$per_class}"
    done
    mapfile -t files < <(find "$photos/seg_pred" -type f | sort)
    cp -t "$gpu_dir.tmp/photos/seg_pred" "${files[@]:0:20}"
    rm -rf "$gpu_dir"
    mv "$gpu_dir.tmp" "$gpu_dir"
    if [ "$device" != cpu ]; then
        # Put the CPU binaries back for the tests and `cargo xtask e2e`.
        cargo build --workspace --bins
    fi
    local size
    size=$(du -sm "$gpu_dir" | cut -f1)
    echo "$gpu_dir: ${size} MiB (the device tool carries 64 MiB)"
    [ "$size" -lt 64 ] || { echo "too large to carry; lower VT_GPU_PER_CLASS" >&2; exit 1; }
}

# The img_per_s of the last epoch in a metrics.jsonl.
last_img_per_s() {
    tail -n 1 "$1" | "$python" -c 'import json, sys; print(round(json.load(sys.stdin)["img_per_s"], 1))'
}

run() {
    local out=${1:-gpu-results}
    local work
    work=$(mktemp -d)
    # shellcheck disable=SC2064 # expand now: `work` is local
    trap "rm -rf '$work'" EXIT
    mkdir -p "$out" "$work/bin"
    for b in "${binaries[@]}"; do
        xz -dc "$gpu_dir/bin/$b.xz" > "$work/bin/$b"
        chmod +x "$work/bin/$b"
    done
    local bin=$work/bin
    # The GPU machines' CUDA 13.0 runtime, cuBLAS, cuRAND and NVRTC (see cuda-toolchain.sh).
    local cuda_lib=/usr/local/cuda-13.0/targets/x86_64-linux/lib
    if [ -d "$cuda_lib" ]; then
        export LD_LIBRARY_PATH="$cuda_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi

    # Sizes: the issue's on a GPU; tiny ones to test the flow on a CPU.
    local epochs=3 train_px=112 e2e_px=224 e2e_batch=128 repeat=8 iters=10 warmup=3
    local cases="train:vt-resnet18:224:128,train:vt-resnet34:224:128,infer:vt-resnet18:224:1,infer:vt-resnet18:224:256,infer:vt-resnet34:224:1,infer:vt-resnet34:224:256"
    local infer_cases="infer:vt-resnet18:224:1,infer:vt-resnet18:224:256,infer:vt-resnet34:224:1,infer:vt-resnet34:224:256"
    local loader_threads workers
    loader_threads=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))
    workers=$(( $(nproc) < 8 ? $(nproc) : 8 ))
    if [ "$device" = cpu ]; then
        epochs=1 train_px=48 e2e_px=48 e2e_batch=16 repeat=1 iters=1 warmup=0
        cases="train:vt-resnet18:48:4,infer:vt-resnet18:48:1"
        infer_cases=""
    fi

    {
        date -u
        nvidia-smi 2>&1 || echo "no nvidia-smi"
        "$python" -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA")'
    } > "$out/machine.txt" 2>&1

    echo "== import the photos"
    "$bin/xtask" fetch-data --from "$gpu_dir/photos" --data-dir "$work/data" --val-fraction 0.1 \
        2> "$out/fetch-data.log"

    echo "== train vt-resnet18 for $epochs epochs on $device"
    "$bin/vt-train" train --data "$work/data" --run-dir "$work/run" --device "$device" \
        --arch vt-resnet18 --image-size "$train_px" --batch-size 64 --epochs "$epochs" \
        --recipe modern --loader-threads "$loader_threads" 2> "$out/train.log"
    cp "$work/run/metrics.jsonl" "$out/train-metrics.jsonl"

    echo "== CPU and $device predictions of the same checkpoint"
    local images=("$work"/data/pred/*)
    "$bin/vt-serve" predict --checkpoint "$work/run/best" --device cpu "${images[@]}" \
        > "$out/predict-cpu.jsonl"
    "$bin/vt-serve" predict --checkpoint "$work/run/best" --device "$device" "${images[@]}" \
        > "$out/predict-device.jsonl"
    local compare=("$out/predict-cpu.jsonl" "$out/predict-device.jsonl")
    if [ "$device" != cpu ]; then
        "$bin/vt-serve" predict --checkpoint "$work/run/best" --device "$device" --dtype bf16 \
            "${images[@]}" > "$out/predict-device-bf16.jsonl"
        compare+=("$out/predict-device-bf16.jsonl")
    fi
    "$python" - "${compare[@]}" <<'PY' | tee "$out/agreement.txt"
import json, sys
def load(path):
    return {r["image"]: r["probs"] for r in map(json.loads, open(path))}
cpu = load(sys.argv[1])
for path, limit in zip(sys.argv[2:], (1e-3, None)):
    other = load(path)
    diff = max(abs(a - b) for k in cpu for a, b in zip(cpu[k], other[k]))
    top1 = sum(max(range(len(p)), key=p.__getitem__) == max(range(len(other[k])), key=other[k].__getitem__)
               for k, p in cpu.items())
    print(f"{path}: {len(cpu)} images, max |p - p_cpu| {diff:.2e}, top-1 agrees on {top1}/{len(cpu)}")
    if limit is not None and diff > limit:
        sys.exit(f"FAIL: probabilities differ by {diff:.2e} > {limit}")
PY

    echo "== model benchmarks against PyTorch on $device"
    "$bin/xtask" bench model --device "$device" --python "$python" --json --iters "$iters" \
        --warmup "$warmup" --threads "$(nproc)" --cases "$cases" | tee "$out/bench-model-f32.jsonl"
    if [ -n "$infer_cases" ]; then
        "$bin/xtask" bench model --device "$device" --dtype bf16 --python "$python" --json \
            --iters "$iters" --warmup "$warmup" --threads "$(nproc)" --cases "$infer_cases" |
            tee "$out/bench-model-bf16.jsonl"
    fi

    echo "== one training epoch from JPEG files, notebook augmentation, $e2e_px px, batch $e2e_batch"
    # Each photo $repeat times, so that the epoch is long enough to time.
    for split in train val; do
        for class_dir in "$work/data/$split"/*/; do
            local class
            class=$(basename "$class_dir")
            mkdir -p "$work/e2e/$split/$class"
            for f in "$class_dir"*; do
                for i in $(seq "$repeat"); do
                    ln -s "$f" "$work/e2e/$split/$class/$i-$(basename "$f")"
                done
            done
        done
    done
    "$bin/vt-train" train --data "$work/e2e" --run-dir "$work/e2e-vt" --device "$device" \
        --recipe seed --arch vt-resnet18 --image-size "$e2e_px" --batch-size "$e2e_batch" \
        --epochs 1 --loader-threads "$loader_threads" 2> "$out/e2e-vt.log"
    "$python" tools/reference/train.py --data "$work/e2e" --run-dir "$work/e2e-torch" \
        --device "$device" --recipe seed --arch vt-resnet18 --image-size "$e2e_px" \
        --batch-size "$e2e_batch" --epochs 1 --loader-workers "$workers" --threads 2 \
        > "$out/e2e-torch.log" 2>&1
    cp "$work/e2e-vt/metrics.jsonl" "$out/e2e-vt-metrics.jsonl"
    cp "$work/e2e-torch/metrics.jsonl" "$out/e2e-torch-metrics.jsonl"
    echo "end-to-end epoch img/s: vt-train $(last_img_per_s "$out/e2e-vt-metrics.jsonl")," \
        "PyTorch DataLoader ($workers workers) $(last_img_per_s "$out/e2e-torch-metrics.jsonl")" |
        tee "$out/e2e.txt"
    echo "results in $out"
}

case "${1:-}" in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    *) echo "usage: bench/gpu.sh prepare | run [OUT]" >&2; exit 2 ;;
esac
