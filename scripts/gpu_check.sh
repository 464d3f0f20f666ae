#!/usr/bin/env bash
# One prepared GPU check: the CUDA tests, then scripts/bench.py for each model and dtype, at the default tolerance
# (with the nodes each input took) and at a fixed N = 10, plus one end-to-end `xclip attribute` ratio; every
# result is a JSON file in OUT, and OUT/table.md is the GPU table of docs/benchmarks.md. Sized for under 8 minutes on one
# H100/H200.
#
#     OUT=gpu-check bash scripts/gpu_check.sh            # on a CUDA machine
#     OUT=gpu-check bash scripts/gpu_check.sh --reduced  # the same steps on CPU with tiny models (CI runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"

if [[ "${1:-}" == "--reduced" ]]; then
    device=cpu
    models=(clip:tiny siglip:tiny clip:demo)
    dtypes=(float32)
    batch=4
    end_to_end=(clip tiny 4)
    workers=0
else
    device=cuda
    models=(clip:vit-b-32 clip:vit-b-16 clip:vit-l-14 siglip:siglip-base open_clip:ViT-B-16 clip:demo)
    dtypes=(float32 bfloat16)  # float32 runs its matrix products in TF32 (bench.py allows it on CUDA)
    batch=32
    end_to_end=(clip vit-b-16 256)
    workers=4
fi

bench() {  # family architecture dtype name [bench.py arguments...]
    local family=$1 architecture=$2 dtype=$3 name=$4
    shift 4
    echo "bench $family $architecture $dtype $name" >&2
    "$PYTHON" scripts/bench.py --family "$family" --architecture "$architecture" --device "$device" --dtype "$dtype" \
        --batch-size "$batch" --repeats 2 --no-naive --no-scaling "$@" --out "$OUT/$family-$architecture-$dtype-$name.json" >/dev/null
}

# the CUDA tests (skipped, and recorded as skipped, where there is no CUDA)
"$PYTHON" -m pytest -q tests/test_gpu.py --junitxml "$OUT/cuda-tests.xml" >&2
for model in "${models[@]}"; do
    family=${model%%:*}
    architecture=${model#*:}
    for dtype in "${dtypes[@]}"; do
        bench "$family" "$architecture" "$dtype" adaptive --end-to-end 0
        bench "$family" "$architecture" "$dtype" fixed10 --n-steps 10 --end-to-end 0
    done
done
# decoding, preprocessing and writing against the engine alone: `xclip attribute` on N photo-sized JPEGs
bench "${end_to_end[0]}" "${end_to_end[1]}" float32 end-to-end --end-to-end "${end_to_end[2]}" --num-workers "$workers"
"$PYTHON" scripts/gpu_table.py "$OUT" > "$OUT/table.md"
cat "$OUT/table.md"
