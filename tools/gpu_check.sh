#!/usr/bin/env bash
# GPU check of fr_distill on one CUDA machine with PyTorch preinstalled and no network:
# about 8 minutes on one H100.
#
#   tools/gpu_check.sh [WHEEL_DIR]
#
# 1. WHEEL_DIR (optional): every wheel in it is installed offline (--no-index --no-deps) first,
#    e.g. nvidia-dali-cuda130, simplejpeg, onnx2torch when the image lacks them; then this
#    repository is installed editable with --no-deps (the machine's torch is never touched).
# 2. The GPU-only tests, `pytest tests_gpu -m gpu`: DALI mixed decode and warp_affine, the
#    teacher under bf16/fp16, an NCCL process group with DDP, a compiled training step and a
#    short GPU training run. They live in tests_gpu/, outside `make test`'s testpaths, so the
#    CPU suite never collects them; without a visible GPU they stop with an error, not a skip.
# 3. `tools/benchmark.py train` for IResNet-100 -> IResNet-18 at batch 64/128/256, bf16 and
#    fp16 eager plus bf16 compiled, distillation vs plain training vs the teacher read from a
#    teacher cache; then one table of images/s, share of the card's dense bf16 peak and peak
#    memory, and the cache's speed-up against its FLOP bound.
# Results: $GPU_CHECK_OUT (default runs/gpu_check/): pytest log, train_gpu.json, summary.txt.
# Exit status: 0 when the tests passed and the benchmark completed, else 1.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-runs/gpu_check}
BUDGET_S=${GPU_CHECK_BUDGET_S:-465}   # stop the benchmark in time to print within 8 minutes
mkdir -p "$OUT"
start=$SECONDS
status=0

if [[ $# -ge 1 ]]; then
    shopt -s nullglob
    wheels=("$1"/*.whl)
    if [[ ${#wheels[@]} -gt 0 ]]; then
        echo "== installing ${#wheels[@]} wheel(s) from $1 (offline, no dependencies)"
        "$PYTHON" -m pip install -q --no-index --no-deps "${wheels[@]}" || exit 1
    fi
fi
echo "== installing fr_distill (editable, --no-deps: torch stays as it is)"
"$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || echo "   editable install failed; using the checkout through PYTHONPATH"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" - <<'PY' || exit 1
import sys, torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible to torch " + torch.__version__)
print(f"== {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
PY

echo "== GPU tests (tests_gpu/)"
timeout 300 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests_gpu 2>&1 | tee "$OUT/pytest.log"
[[ ${PIPESTATUS[0]} -eq 0 ]] || status=1

left=$(( BUDGET_S - (SECONDS - start) ))
echo "== train benchmark (${left}s left of the budget)"
rm -f "$OUT/train_gpu.json"
timeout "$(( left > 60 ? left : 60 ))" "$PYTHON" tools/benchmark.py train \
    --teacher iresnet100 --student iresnet18 --batch 64 128 256 --amp bf16 fp16 \
    --compile bf16 --cache --steps 20 --warmup 5 --json "$OUT/train_gpu.json" \
    || { echo "   benchmark stopped early (time budget or error); partial results follow"; status=1; }

echo "== summary ($(( SECONDS - start ))s)"
"$PYTHON" -c "
import json, sys
from benchmarks.train import summary_table
report = json.load(open(sys.argv[1]))
print(report['machine'].get('gpu', '?'), '| dense bf16 peak', report['peak_bf16_tflops'], 'TFLOP/s |',
      'GFLOP/image', {k: round(v['step'], 1) for k, v in report['gflop_per_image'].items()})
print(summary_table(report))
for gain in report.get('teacher_cache', []):
    print(f\"batch {gain['batch']} {gain['amp']} {gain['mode']}: teacher cache speed-up {gain['speedup']:.2f}x,\",
          f\"FLOP bound {gain['bound']:.2f}x ({100 * gain['share_of_bound']:.0f} %)\")
" "$OUT/train_gpu.json" | tee "$OUT/summary.txt" || status=1
exit $status
