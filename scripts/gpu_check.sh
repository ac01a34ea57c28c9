#!/usr/bin/env bash
# The GPU path of capcli, checked on a bare CUDA machine in under ten minutes (each step has a
# time limit: 200 + 2 x 100 + 120 + 120 s at most):
#   1. the CUDA tests of the suite (tests/test_cuda.py: every precision, cache, exact resume, decoding);
#   2. `capcli benchmark train` of convnext_small at 224 px, fine-tuning: fp32 against bf16 + channels_last
#      (target: bf16 + channels_last >= 2x fp32);
#   3. DDP over every GPU through torchrun (when there are two or more);
#   4. a short quickstart on the GPU.
# Needs a Python with torch, timm, typer, rich, h5py, sacrebleu, pyyaml, pillow and pytest; capcli
# itself runs from this checkout (no install, no network). Wheels of anything else can be put in
# .whl/ beside this repo's root; they are installed into /tmp/site first.
#
#   bash scripts/gpu_check.sh [OUT_DIR]        # prints a summary; logs and JSON go to OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-/tmp/capcli-gpu-check}}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
status=0
section() { printf '\n=== %s (%s) ===\n' "$1" "$(date +%T)"; }

section "machine"
"$PY" - <<'EOF' || { echo "no usable CUDA: stop"; exit 1; }
import torch, timm
assert torch.cuda.is_available(), "torch sees no CUDA device"
n = torch.cuda.device_count()
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), timm {timm.__version__}, {n} GPU(s):",
      ", ".join(torch.cuda.get_device_name(i) for i in range(n)), "| bf16:", torch.cuda.is_bf16_supported())
EOF
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())')

section "1. CUDA tests"
timeout 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/cuda_tests.log" | tail -n 15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

section "2. benchmark train: convnext_small, 224 px, fine-tuning, 32 pairs a step"
for run in "fp32 off false" "bf16_cl bf16 true"; do
  set -- $run
  timeout 100 "$PY" -m capcli benchmark train --encoder convnext_small --image-size 224 --batch 160 --mode finetune \
    --steps 20 --warmup 5 --amp "$2" --channels-last "$3" --device cuda --quiet --output "$OUT/train_$1.json" \
    > "$OUT/train_$1.log" 2>&1 || { status=1; tail -n 5 "$OUT/train_$1.log"; }
done
"$PY" - "$OUT" <<'EOF' || status=1
import json, sys
out = sys.argv[1]
a, b = (json.load(open(f"{out}/train_{n}.json")) for n in ("fp32", "bf16_cl"))
for name, r in (("fp32", a), ("bf16 + channels_last", b)):
    print(f"{name:>22}: {r['samples_per_s']:8.1f} pairs/s, step {r['step_ms']:6.1f} ms, peak {r['peak_mem_mb']:6.0f} MB, "
          f"batch {r['batch']} (OOM retries {r['oom_retries']})")
ratio = b["samples_per_s"] / a["samples_per_s"]
print(f"bf16 + channels_last / fp32 = {ratio:.2f}x (target >= 2x): {'ok' if ratio >= 2 else 'BELOW TARGET'}")
EOF

section "3. DDP"
if [ "$NGPU" -ge 2 ]; then
  "$PY" -m capcli prepare synthetic --out "$OUT/ddp-data" --images 400 --size 64 --quiet
  timeout 120 "$PY" -m torch.distributed.run --nproc_per_node "$NGPU" -m capcli train tiny \
    data.dir="$OUT/ddp-data" run.dir="$OUT/ddp-runs" run.name=ddp train.epochs=2 --device cuda 2>&1 \
    | tee "$OUT/ddp.log" | tail -n 4
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
  echo "one GPU: DDP over NCCL not checked here (the CPU suite checks DDP over gloo)"
fi

section "4. quickstart on the GPU"
timeout 120 "$PY" -m capcli quickstart --out "$OUT/quickstart" --images 300 --epochs 2 --device cuda 2>&1 \
  | tee "$OUT/quickstart.log" | tail -n 12
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

section "done"
echo "exit status $status; logs and JSON in $OUT"
exit $status
