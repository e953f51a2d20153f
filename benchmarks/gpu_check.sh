#!/usr/bin/env bash
# The GPU checks in one call, for a machine with a CUDA GPU and PyTorch (nothing is installed; the package
# runs from this checkout):
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]          # default: $OUT, else gpu-check/
#     GPU_CHECK_SECONDS=540 BATCH=64 bash benchmarks/gpu_check.sh
#     ONLY="bench_b4x_eager bench_b4x_graphs" bash benchmarks/gpu_check.sh   # some stages only (names below)
#     BUNDLE=$OUT/gpu-check.tgz bash benchmarks/gpu_check.sh /tmp/gpu-check    # also keep a tarball of OUT_DIR,
#                                                   # refreshed after every stage (one file to fetch)
#
# In order, each under a time cap, stopping cleanly when GPU_CHECK_SECONDS (default 540) are spent:
#   1. the machine (nvidia-smi, torch, the GPU's name)              -> env.txt
#   2. bitdance bench rows at batch $BATCH (B-16x first, eager and CUDA graphs; then B-4x, B-1x, 512 px),
#      one JSON line each                                           -> bench_cuda.jsonl, bench_cuda.md, bench_*.log
#   3. a torch.profiler run of B-16x (the ops on the GPU and host)  -> profile/profile.txt, profile/trace.json.gz
#   4. the GPU tests (tests/test_devices.py)                        -> tests.log
#   5. the tokenizer decode, NCHW vs channels_last                  -> decode_layout.txt
# Everything is written as it is made, so a run cut short keeps what it did. Copy bench_cuda.md's rows into
# docs/benchmarks.md (GPU section) and bench_cuda.jsonl to docs/assets/bench_cuda.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu-check}}
BUDGET=${GPU_CHECK_SECONDS:-540}
BATCH=${BATCH:-64}
DEVICE=${DEVICE:-cuda}  # cpu only to try this script out
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}

left() { echo $((BUDGET - SECONDS)); }

# step NAME CAP_SECONDS COMMAND...: run with its output in OUT_DIR/NAME.log, within the cap and the budget
step() {
  local name=$1 cap=$2 l
  shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then
    return 0
  fi
  l=$(left)
  if ((l < 20)); then
    echo "skipped $name: time budget spent" | tee -a "$OUT_DIR/summary.txt"
    return 0
  fi
  ((cap > l)) && cap=$l
  local t0=$SECONDS
  timeout "$cap" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - t0)) s$([ $rc = 124 ] && echo " (cut at ${cap} s)")" | tee -a "$OUT_DIR/summary.txt"
  bundle
  return 0
}

bundle() {
  if [ -n "${BUNDLE:-}" ]; then
    tar czf "$BUNDLE.part" -C "$(dirname "$OUT_DIR")" "$(basename "$OUT_DIR")" && mv "$BUNDLE.part" "$BUNDLE"
  fi
}

bench() { # NAME CAP ARGS...: one bench row, its JSON line appended to bench_cuda.jsonl
  local name=$1 cap=$2
  shift 2
  [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" bench_$name "* ]] && return 0
  step "bench_$name" "$cap" $PY -m bitdance bench --device "$DEVICE" --dtype bf16 --batch "$BATCH" --steps 25 \
    --cfg 4.0 --json "$@"
  tail -n 1 "$OUT_DIR/bench_$name.log" 2>/dev/null | grep '^{' >>"$OUT_DIR/bench_cuda.jsonl" || true
}

: >"$OUT_DIR/summary.txt"
{
  date -u
  nvidia-smi || true
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda); print(torch.cuda.get_device_name(0)); print('bf16', torch.cuda.is_bf16_supported())"
  nproc
} >"$OUT_DIR/env.txt" 2>&1

bench b16x_eager 120 --preset BitDance-B-16x --compare-fp32 --repeats 2
bench b16x_graphs 200 --preset BitDance-B-16x --compile reduce-overhead --repeats 2
bench b16x_nodecode_eager 90 --preset BitDance-B-16x --no-decode --repeats 2
step profile 90 $PY -m bitdance bench --device "$DEVICE" --dtype bf16 --batch "$BATCH" --steps 25 --cfg 4.0 \
  --preset BitDance-B-16x --profile "$OUT_DIR/profile"
step tests 240 $PY -m pytest -q -p no:cacheprovider tests/test_devices.py
bench b4x_eager 120 --preset BitDance-B-4x
bench b4x_graphs 200 --preset BitDance-B-4x --compile reduce-overhead
bench b16x_nodecode_graphs 150 --preset BitDance-B-16x --no-decode --compile reduce-overhead
step decode_layout 90 $PY - "$OUT_DIR/decode_layout.txt" <<'EOF'
# The d16c32 decoder on 16 latents at 256 px in bf16, default (NCHW) vs channels_last memory format.
import sys, time, torch
from bitdance import BinaryTokenizer, tokenizer_preset
with torch.device("cuda"):
    tok = BinaryTokenizer(tokenizer_preset("d16c32")).eval().to(torch.bfloat16)
    z = torch.randn(16, 32, 16, 16).sign().to(torch.bfloat16)
lines = []
for name, fmt in [("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)]:
    tok = tok.to(memory_format=fmt)
    zz = z.contiguous(memory_format=fmt)
    with torch.inference_mode():
        tok.decode(zz); torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            tok.decode(zz)
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / 5
    lines.append(f"{name}: {dt * 1e3:.1f} ms per 16 images ({16 / dt:.1f} images/s, {16 * 1.2675e12 / dt / 1e12:.0f} TFLOP/s)")
open(sys.argv[1], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
bench b1x_eager 150 --preset BitDance-B-1x
bench b16x_512_eager 150 --preset BitDance-B-16x --image-size 512

if [ -s "$OUT_DIR/bench_cuda.jsonl" ]; then
  $PY benchmarks/bench_table.py --render "$OUT_DIR/bench_cuda.jsonl" >"$OUT_DIR/bench_cuda.md" 2>&1
  cat "$OUT_DIR/bench_cuda.md"
fi
bundle
cat "$OUT_DIR/summary.txt"
tail -n 3 "$OUT_DIR/tests.log" 2>/dev/null || true
