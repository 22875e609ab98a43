#!/usr/bin/env bash
# The first thing to run on a lent GPU (one script, at most 7.5 minutes: its three timeouts add up to 440 s; no Ray,
# no network):
#   1. benchmarks/gpu_check.py: Triton kernels compiled for real (rejection sampling at k 1-8, int8/int4 linears
#      timed against dequantize + cuBLAS), exactness against HF on CUDA (shipped pair, tiny Qwen2.5-VL and Gemma 3),
#      sampling against HF's, bf16 agreement, the compiled step against eager (4 shape buckets compiled: about
#      90 s of the 270, an estimate: not yet run on a GPU); one table (and $OUT/gpu_check.json), exit 1 on a difference;
#   2. benchmarks/speculative.py --device cuda: the engine in bf16 against HF's best dtype, one timing table;
#   3. benchmarks/roofline.py --measure: a 7B-wide decoder's forwards timed against the roofline arithmetic.
# Usage (repository root, on the GPU machine): bash benchmarks/gpu_check.sh [rows]   (output also in $OUT if set)
set -uo pipefail
cd "$(dirname "$0")/.."
ROWS="${1:-64}"
LOG="${OUT:-/tmp}/gpu_check.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -c "import transformers, triton, torch; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
status=0
timeout 270 python3 benchmarks/gpu_check.py --device cuda --rows "$ROWS" --out "${OUT:-/tmp}" 2>&1 | tee -a "$LOG" || status=1
timeout 120 python3 benchmarks/speculative.py --device cuda --rows "$((ROWS * 2))" 2>&1 | tee -a "$LOG" || status=1
timeout 50 python3 benchmarks/roofline.py --measure --device cuda 2>&1 | tee -a "$LOG" || status=1
echo "gpu_check: exit $status (log: $LOG)"
exit $status
