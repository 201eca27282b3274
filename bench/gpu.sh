#!/usr/bin/env bash
# The GPU check (issue #6): prepared on the build machine, run once on an NVIDIA machine.
#
#   bench/gpu.sh prepare      # here: CUDA builds of vt-train, vt-serve, xtask and vt-model's
#                             # test binaries, stripped and xz-compressed, plus a subset of the
#                             # intel-sample photos, into target/gpu (with the repository's
#                             # tracked files, under the 64 MiB the
#                             # device tool carries)
#   bench/gpu.sh run [OUT]    # there, from the repository root: results into OUT
#                             # (default gpu-results/), a summary on stdout
#
# Through the device tool (which returns at most 8 files), carry target/gpu and let `run` pack
# OUT after every step (VT_GPU_PACK), so that a command stopped at its time limit still
# returns every finished step's results:
#   VT_GPU_PACK=$OUT/gpu-results.tgz bash bench/gpu.sh run /tmp/r > $OUT/stdout.txt 2>&1
#
# `run` (0) runs the GPU tests (vt-model's CUDA kernels and fused optimiser updates against the
# CPU's, the golden tests against PyTorch, the loader's page-locked batches against the CPU's); (1)
# imports the photos with `xtask fetch-data`; (2) trains vt-resnet18 for a few epochs on them, with
# TF32 convolutions and again in full f32; (3) scores the same checkpoint on CPU and GPU with
# `vt-serve predict` and fails when a probability differs by more than 1e-3 (bf16 differences are
# reported); (4) serves it over HTTP on the GPU (start-up, answers against (3)'s, requests/s); (5)
# measures training img/s (vt-resnet18 and vt-resnet34, 224 px, batch 128) and inference img/s
# (batch 1 and 256) with `xtask bench model`, PyTorch (python3, tools/reference) on the same GPU in
# the same call; (6) times one end-to-end training epoch with the notebook's augmentation from JPEG
# files (224 px, batch 128) against PyTorch's DataLoader; (7) measures bf16 inference and training
# in full f32 (no TF32); (8) profiles the kernels of a training step and of inference (Nsight
# Compute, if present; not where ncu cannot read the GPU's counters). (5) runs right after (1),
# while the whole budget is left. Each step has a time limit within the run's budget (a lent GPU's
# time is short): a failed step is recorded in steps.txt and the next one runs; the exit status is
# non-zero when any step failed.
# The binaries are built with the `cudnn` feature; the GPU machine's cuDNN 9 is PyTorch's.
#
# Environment: VT_GPU_DEVICE (default cuda; `cpu` runs every step on the CPU with tiny sizes,
# which is how this script is tested without a GPU), VT_PYTHON (default python3),
# VT_GPU_PER_CLASS (photos per class that `prepare` copies, default 90), VT_GPU_DIR (what
# `prepare` writes and `run` reads, default target/gpu), VT_GPU_BUDGET_S (the run's time
# budget, default 500 s), VT_GPU_PACK (a .tgz that `run` rewrites with OUT after each step).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
device=${VT_GPU_DEVICE:-cuda}
python=${VT_PYTHON:-python3}
gpu_dir=${VT_GPU_DIR:-target/gpu}
binaries=(vt-train vt-serve xtask)

# The `cudnn` feature links libcudnn.so.9, which the GPU machines have (PyTorch's) and this
# machine has not: a link-time stub that declares every cudnn* entry point cudarc binds, as
# cuda-toolchain.sh does for libcuda. The real library is found at run time (see `run`).
cudnn_stub() {
    local stubs=target/cudnn-stub sys
    sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/cudnn/sys/mod.rs | sort -V | tail -n 1)
    mkdir -p "$stubs"
    grep -oE 'fn cudnn[A-Za-z0-9_]+' "$sys" | awk '{print $2}' | sort -u |
        awk '{print "int "$1"(void){return 1;}"}' > "$stubs/libcudnn_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcudnn.so.9 -o "$stubs/libcudnn.so" "$stubs/libcudnn_stub.c"
    export LIBRARY_PATH="$PWD/$stubs:$LIBRARY_PATH"
}

prepare() {
    local per_class=${VT_GPU_PER_CLASS:-90}
    local photos=../shared/data/intel-sample
    [ -d "$photos/seg_train" ] || { echo "no photos at $photos (see its README)" >&2; exit 1; }
    local features=()
    if [ "$device" != cpu ]; then
        # The toolchain's libcuda stub and cudnn_stub read cudarc's sources from the registry.
        cargo fetch
        local toolchain
        toolchain=$(../shared/gpu/cuda-toolchain.sh)
        eval "$toolchain"
        cudnn_stub
        features=(--features vt-train/cudnn,vt-serve/cudnn,xtask/cudnn)
    fi
    cargo build -p vt-train -p vt-serve -p xtask "${features[@]}"
    rm -rf "$gpu_dir.tmp"
    mkdir -p "$gpu_dir.tmp/bin" "$gpu_dir.tmp/photos/seg_pred"
    for b in "${binaries[@]}"; do
        strip -o "$gpu_dir.tmp/bin/$b" "${CARGO_TARGET_DIR:-target}/debug/$b"
        # -9e: 5 % smaller than the default level, which counts against the 64 MiB.
        xz -T0 -9e "$gpu_dir.tmp/bin/$b"
    done
    if [ "$device" != cpu ]; then
        # The tests that skip where there is no GPU, run by `run`'s first step: vt-model's
        # (its CUDA kernels and the optimisers' fused updates against the CPU's, the golden
        # tests on the GPU) and vt-data's loader (batches staged in page-locked memory).
        mkdir -p "$gpu_dir.tmp/tests"
        local built name
        built=$(cargo test -p vt-model --features cudnn --lib --test golden --no-run 2>&1)
        built+=$'\n'$(cargo test -p vt-data --features cuda --test loader --no-run 2>&1)
        for name in vt_model golden loader; do
            strip -o "$gpu_dir.tmp/tests/$name" \
                "$(grep -oE "[^ (]*/debug/deps/$name-[0-9a-f]+" <<< "$built" | head -n 1)"
            xz -T0 -9e "$gpu_dir.tmp/tests/$name"
        done
    fi
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
    # What travels to the GPU machine: the repository's tracked files and the carried folder.
    local carried tracked
    carried=$(du -sb "$gpu_dir" | cut -f1)
    tracked=$(git ls-files -z | xargs -0 du -cb | tail -n 1 | cut -f1)
    echo "$gpu_dir: $((carried >> 20)) MiB, with the tracked files $(((carried + tracked) >> 20)) MiB" \
        "(the device tool carries 64 MiB)"
    ((carried + tracked < 63 << 20)) || { echo "too large to carry; lower VT_GPU_PER_CLASS" >&2; exit 1; }
}

# The img_per_s of the last epoch in a metrics.jsonl.
last_img_per_s() {
    tail -n 1 "$1" | "$python" -c 'import json, sys; print(round(json.load(sys.stdin)["img_per_s"], 1))'
}

# Runs one step of `run` (a function) in a subshell under its own time limit, cut to what is
# left of the whole run's budget: a step that fails or runs out of time is recorded in
# steps.txt and the next one starts, so one broken step never costs the others' results.
step() {
    local name=$1 limit=$2 now left rc=0
    shift 2
    now=$(date +%s)
    left=$((deadline - now))
    ((limit <= left)) || limit=$left
    if ((limit < 15)); then
        echo "$name: skipped, the run's time budget is spent" | tee -a "$out/steps.txt"
        return 0
    fi
    step_end=$((now + limit))
    echo "== $name (at most $limit s)"
    ("$@") &
    wait $! || rc=$?
    echo "$name: rc $rc after $(($(date +%s) - now)) s" | tee -a "$out/steps.txt"
    # Packed after every step, so that a run stopped from outside still returns what it has.
    [[ -z ${VT_GPU_PACK:-} ]] || tar czf "$VT_GPU_PACK" -C "$(dirname "$out")" "$(basename "$out")"
}

# Runs a command until the current step's time is up.
within() {
    local left=$((step_end - $(date +%s)))
    ((left > 0)) || return 124
    timeout --kill-after=5 "$left" "$@"
}

# The tests built by `prepare` (test binary, crate), on this machine's GPU.
gpu_tests() {
    local t crate
    for t in vt_model:vt-model golden:vt-model loader:vt-data; do
        crate=${t#*:}
        t=${t%%:*}
        xz -dc "$gpu_dir/tests/$t.xz" > "$work/test-$t"
        chmod +x "$work/test-$t"
        # VT_REQUIRE_GPU: a GPU test that finds no device fails instead of skipping.
        within env VT_REQUIRE_GPU=1 CARGO_MANIFEST_DIR="$PWD/crates/$crate" "$work/test-$t" \
            --test-threads 1 >> "$out/gpu-tests.log" 2>&1 ||
            { tail -n 40 "$out/gpu-tests.log"; return 1; }
    done
    grep -E "^test result" "$out/gpu-tests.log"
}

machine_info() {
    date -u
    nvidia-smi 2>&1 || echo "no nvidia-smi"
    within "$python" -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA")'
}

import_photos() {
    within "$bin/xtask" fetch-data --from "$gpu_dir/photos" --data-dir "$work/data" \
        --val-fraction 0.1 2> "$out/fetch-data.log"
}

# The same run twice: with TF32 convolutions (vt-train's default on a GPU, as PyTorch's), then
# in full f32, to show what TF32 does to accuracy.
train_few_epochs() {
    local tf32 run
    for tf32 in true false; do
        run=run$([ "$tf32" = true ] || echo -f32)
        within "$bin/vt-train" train --data "$work/data" --run-dir "$work/$run" \
            --device "$device" --arch vt-resnet18 --image-size "$train_px" --batch-size 64 \
            --epochs "$epochs" --recipe modern --seed 0 --tf32 "$tf32" \
            --loader-threads "$loader_threads" 2> "$out/$run.log"
        cp "$work/$run/metrics.jsonl" "$out/$run-metrics.jsonl"
        echo "--tf32 $tf32:"
        cat "$out/$run-metrics.jsonl"
    done
}

predictions_agree() {
    local images=("$work"/data/pred/*)
    within "$bin/vt-serve" predict --checkpoint "$work/run/best" --device cpu "${images[@]}" \
        > "$out/predict-cpu.jsonl"
    within "$bin/vt-serve" predict --checkpoint "$work/run/best" --device "$device" \
        "${images[@]}" > "$out/predict-device.jsonl"
    local compare=("$out/predict-cpu.jsonl" "$out/predict-device.jsonl")
    if [ "$device" != cpu ]; then
        within "$bin/vt-serve" predict --checkpoint "$work/run/best" --device "$device" \
            --dtype bf16 "${images[@]}" > "$out/predict-device-bf16.jsonl"
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
}

# vt-serve on the device: its start-up (which on a GPU runs every batch size it will meet
# first), its answers over HTTP against `vt-serve predict` on the same device (the same
# checkpoint; batches of other sizes may round differently, hence 1e-4), and requests per
# second from 16 concurrent clients.
serve_over_http() {
    local start=$SECONDS
    # timeout itself in the background (not `within`, a function, whose subshell would leave
    # the server running when killed): it passes the final kill on to the server.
    timeout --kill-after=5 "$((step_end - $(date +%s)))" "$bin/vt-serve" \
        --checkpoint "$work/run/best" --device "$device" --port 0 --max-batch 32 \
        > "$work/serve.out" 2> "$out/serve.log" &
    local server=$!
    until grep -q "^listening on " "$work/serve.out" 2> /dev/null; do
        kill -0 "$server" 2> /dev/null || { tail -n 20 "$out/serve.log"; return 1; }
        sleep 0.2
    done
    echo "vt-serve listening after $((SECONDS - start)) s" | tee "$out/serve.txt"
    grep "warmed up" "$out/serve.log" | tee -a "$out/serve.txt" || true
    local rc=0
    "$python" - "$(sed -n 's/^listening on //p' "$work/serve.out")" "$out/predict-device.jsonl" \
        "$work"/data/pred/* <<'PY' 2>&1 | tee -a "$out/serve.txt" || rc=$?
import concurrent.futures, json, sys, time, urllib.request
base, offline, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
expected = {r["image"]: r["probs"] for r in map(json.loads, open(offline))}
classes = json.load(urllib.request.urlopen(base + "/v1/models"))["models"][0]["classes"]
def ask(path):
    body = open(path, "rb").read()
    request = urllib.request.Request(base + "/predict?top_k=%d" % len(classes), body,
                                     {"Content-Type": "application/octet-stream"})
    start = time.perf_counter()
    answer = json.load(urllib.request.urlopen(request))
    return path, answer, time.perf_counter() - start
worst = 0.0
for path, answer, _ in map(ask, paths):
    probs = expected[path]
    for p in answer["predictions"]:
        worst = max(worst, abs(p["score"] - probs[classes.index(p["label"])]))
print(f"{len(paths)} photos over HTTP: max |score - predict's| {worst:.2e}")
requests = [paths[i % len(paths)] for i in range(640)]
start = time.perf_counter()
with concurrent.futures.ThreadPoolExecutor(16) as pool:
    latencies = sorted(t for _, _, t in pool.map(ask, requests))
took = time.perf_counter() - start
print(f"{len(requests)} requests, 16 clients: {len(requests) / took:.1f} req/s, "
      f"p50 {1e3 * latencies[len(latencies) // 2]:.1f} ms, p99 {1e3 * latencies[int(0.99 * len(latencies))]:.1f} ms")
if worst > 1e-4:
    sys.exit(f"FAIL: served scores differ from predict's by {worst:.2e}")
PY
    kill "$server" 2> /dev/null
    wait "$server" || true
    return "$rc"
}

bench_model() {
    local dtype=$1 cases=$2
    shift 2
    within "$bin/xtask" bench model --device "$device" --dtype "$dtype" --python "$python" \
        --json --iters "$iters" --warmup "$warmup" --threads "$(nproc)" --cases "$cases" "$@" \
        2>> "$out/bench-model.log" | tee -a "$out/bench-model.jsonl"
}

# One training epoch from JPEG files with the notebook's augmentation, each photo `repeat`
# times so that the epoch is long enough to time (29 x 486 = 14,094 images: the size of the
# data set's training split, over which one-time costs such as cuDNN's timing of its
# algorithms spread as in a real epoch): vt-train, then PyTorch's DataLoader.
end_to_end_epoch() {
    # One process for the ~15,000 links: a shell loop spends tens of seconds starting `ln`s.
    "$python" - "$work/data" "$work/e2e" "$repeat" <<'PY'
import os, sys
data, e2e, repeat = sys.argv[1], sys.argv[2], int(sys.argv[3])
for split in ("train", "val"):
    for cls in sorted(os.listdir(os.path.join(data, split))):
        src = os.path.join(data, split, cls)
        if not os.path.isdir(src):
            continue
        dst = os.path.join(e2e, split, cls)
        os.makedirs(dst, exist_ok=True)
        for name in sorted(os.listdir(src)):
            for i in range(1, repeat + 1):
                os.symlink(os.path.join(src, name), os.path.join(dst, f"{i}-{name}"))
PY
    within "$bin/vt-train" train --data "$work/e2e" --run-dir "$work/e2e-vt" --device "$device" \
        --recipe seed --arch vt-resnet18 --image-size "$e2e_px" --batch-size "$e2e_batch" \
        --epochs 1 --loader-threads "$loader_threads" 2> "$out/e2e-vt.log"
    cp "$work/e2e-vt/metrics.jsonl" "$out/e2e-vt-metrics.jsonl"
    within "$python" tools/reference/train.py --data "$work/e2e" --run-dir "$work/e2e-torch" \
        --device "$device" --recipe seed --arch vt-resnet18 --image-size "$e2e_px" \
        --batch-size "$e2e_batch" --epochs 1 --loader-workers "$workers" --threads 2 \
        > "$out/e2e-torch.log" 2>&1
    cp "$work/e2e-torch/metrics.jsonl" "$out/e2e-torch-metrics.jsonl"
    echo "end-to-end epoch img/s: vt-train $(last_img_per_s "$out/e2e-vt-metrics.jsonl")," \
        "PyTorch DataLoader ($workers workers) $(last_img_per_s "$out/e2e-torch-metrics.jsonl")" |
        tee "$out/e2e.txt"
}

# Kernel time per kernel name of one step of each case, with Nsight Compute where the machine
# has it: what to speed up next.
kernel_profile() {
    local ncu
    ncu=$(command -v ncu) || { echo "no ncu on this machine"; return 0; }
    local case name
    for case in train:vt-resnet18:224:128 infer:vt-resnet18:224:256 infer:vt-resnet18:224:1; do
        name=profile-${case//:/-}
        # The timed iteration only (xtask starts the profiler after the warm-up, which
        # picks the convolution algorithms).
        if ! within "$ncu" --clock-control none --metrics gpu__time_duration.sum --csv \
            --profile-from-start off --log-file "$out/$name.csv" "$bin/xtask" bench model \
            --device "$device" --no-torch --json --iters 1 --warmup 1 --threads "$(nproc)" \
            --cases "$case" > "$out/$name.log" 2>&1; then
            # Some machines (gVisor's) give ncu no access to the GPU's counters.
            if grep -q "Failed to initialize the profiler" "$out/$name.log" "$out/$name.csv" 2>/dev/null; then
                echo "ncu cannot profile on this machine: $(grep -h -m 1 "Failed to initialize" "$out/$name.log" "$out/$name.csv" 2>/dev/null | head -n 1)"
                return 0
            fi
            return 1
        fi
        "$python" - "$out/$name.csv" <<'PY' | tee "$out/$name.txt"
import collections, csv, sys
unit = {"ns": 1e-6, "us": 1e-3, "ms": 1.0}
total, count = collections.Counter(), collections.Counter()
with open(sys.argv[1]) as f:
    for row in csv.DictReader(line for line in f if line.startswith('"')):
        ms = float(row["Metric Value"].replace(",", "")) * unit[row["Metric Unit"]]
        total[row["Kernel Name"][:100]] += ms
        count[row["Kernel Name"][:100]] += 1
print(f"{sys.argv[1]}: {sum(count.values())} kernels, {sum(total.values()):.1f} ms in one step")
for name, ms in total.most_common(15):
    print(f"{ms:9.2f} ms {count[name]:6d}x  {name}")
PY
    done
}

run() {
    out=${1:-gpu-results}
    # The whole run's budget in seconds (the device tool stops a command at 600).
    deadline=$(($(date +%s) + ${VT_GPU_BUDGET_S:-500}))
    work=$(mktemp -d)
    # shellcheck disable=SC2064 # expand now
    trap "rm -rf '$work'" EXIT
    mkdir -p "$out" "$work/bin"
    : > "$out/steps.txt"
    for b in "${binaries[@]}"; do
        xz -dc "$gpu_dir/bin/$b.xz" > "$work/bin/$b"
        chmod +x "$work/bin/$b"
    done
    bin=$work/bin
    # The GPU machines' CUDA 13.0 runtime, cuBLAS, cuRAND and NVRTC (see cuda-toolchain.sh).
    local cuda_lib=/usr/local/cuda-13.0/targets/x86_64-linux/lib
    if [ -d "$cuda_lib" ]; then
        export LD_LIBRARY_PATH="$cuda_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
    # cuDNN 9: the copy PyTorch loads on the GPU machines, so both sides run the same
    # library; any other copy only when that one is missing.
    if [ "$device" != cpu ]; then
        local cudnn_dir
        cudnn_dir=$(python3 -c 'import os, nvidia.cudnn as c; print(os.path.join(list(c.__path__)[0], "lib"))' 2>/dev/null) || true
        if [ ! -e "$cudnn_dir/libcudnn.so.9" ]; then
            cudnn_dir=$(find / -xdev -name 'libcudnn.so.9' -printf '%h\n' 2>/dev/null | sort -V | tail -n 1) || true
        fi
        if [ -n "$cudnn_dir" ]; then
            echo "cuDNN from $cudnn_dir" | tee "$out/cudnn.txt"
            export LD_LIBRARY_PATH="$cudnn_dir:${LD_LIBRARY_PATH:-}"
        else
            echo "warning: no libcudnn.so.9 on this machine" >&2
        fi
    fi

    # Sizes: the issue's on a GPU; tiny ones to test the flow on a CPU.
    epochs=3 train_px=112 e2e_px=224 e2e_batch=128 repeat=29 iters=10 warmup=3
    local cases="train:vt-resnet18:224:128,train:vt-resnet34:224:128,infer:vt-resnet18:224:1,infer:vt-resnet18:224:256,infer:vt-resnet34:224:1,infer:vt-resnet34:224:256"
    local infer_cases="infer:vt-resnet18:224:1,infer:vt-resnet18:224:256,infer:vt-resnet34:224:1,infer:vt-resnet34:224:256"
    local train_cases="train:vt-resnet18:224:128,train:vt-resnet34:224:128"
    loader_threads=$(($(nproc) > 2 ? $(nproc) - 2 : 1))
    workers=$(($(nproc) < 8 ? $(nproc) : 8))
    if [ "$device" = cpu ]; then
        epochs=1 train_px=48 e2e_px=48 e2e_batch=16 repeat=1 iters=1 warmup=0
        cases="train:vt-resnet18:48:4,infer:vt-resnet18:48:1"
        infer_cases=""
    fi

    step "machine" 30 machine_info > "$out/machine.txt" 2>&1
    if [ -d "$gpu_dir/tests" ]; then
        step "vt-model's and the loader's tests on $device" 90 gpu_tests
    fi
    step "import the photos" 30 import_photos
    # The issue's numbers first, while the whole budget is left.
    step "model benchmarks against PyTorch on $device" 180 bench_model f32 "$cases"
    step "train vt-resnet18 for $epochs epochs on $device" 120 train_few_epochs
    step "CPU and $device predictions of the same checkpoint" 40 predictions_agree
    step "vt-serve over HTTP on $device" 40 serve_over_http
    step "one training epoch from JPEG files, $e2e_px px, batch $e2e_batch" 150 end_to_end_epoch
    if [ -n "$infer_cases" ]; then
        step "bf16 inference benchmarks" 60 bench_model bf16 "$infer_cases"
        step "training in full f32 (no TF32)" 40 bench_model f32 "$train_cases" --no-tf32 --no-torch
        step "kernel profile" 120 kernel_profile
    fi
    echo "results in $out"
    cat "$out/steps.txt"
    ! grep -qv ": rc 0 " "$out/steps.txt"
}

case "${1:-}" in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    *) echo "usage: bench/gpu.sh prepare | run [OUT]" >&2; exit 2 ;;
esac
