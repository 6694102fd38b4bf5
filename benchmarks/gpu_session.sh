#!/usr/bin/env bash
# Everything a GPU session measures, in one call: the Multi30k runs (benchmarks/multi30k_gpu.sh), then the
# speed benchmarks (benchmarks/gpu_check.sh) while time remains. Results are packed into
# $OUT/results.tar.gz after each stage, so a call cut short still returns what finished.
#   OUT=DIR bash benchmarks/gpu_session.sh DATA_DIR [TRAIN_SECONDS] [BUDGET_SECONDS] [STAGES]
# STAGES: any of multi30k, new, profiles, graphs, eager, tests, compiled (default: multi30k,new,eager,tests,compiled).
set -uo pipefail
cd "$(dirname "$0")/.."
DATA="$(realpath "${1:?data directory}")"
TRAIN_S="${2:-300}"
BUDGET="${3:-570}"
STAGES="${4:-multi30k,new,eager,tests,compiled}"
OUT="${OUT:-/tmp/gpu_session_out}"
export DEADLINE=$(( $(date +%s) + BUDGET ))
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" MPLBACKEND=Agg PYTHONUNBUFFERED=1
WORK=/tmp/gpu_session
mkdir -p "$WORK" "$OUT"
LOG="$WORK/session.log"

# The background packer below and the packing after each stage may run at once: each writes its own
# partial file (one shared name would interleave two archives into one corrupt file), then renames it.
pack() {
  local part="$OUT/.results.tar.gz.$BASHPID"
  tar czf "$part" -C "$WORK" . 2> /dev/null; mv "$part" "$OUT/results.tar.gz"; cp "$LOG" "$OUT/session.log"
}
say() { echo "[$(( $(date +%s) - DEADLINE + BUDGET )) s] $*" | tee -a "$LOG"; }

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, transformers, sentencepiece, sacrebleu; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'sacrebleu', sacrebleu.__version__)"
  nproc; git rev-parse HEAD 2>/dev/null || true
} 2>&1 | tee "$WORK/environment.txt" | tee -a "$LOG"
(while sleep 60; do pack; done) > /dev/null 2>&1 &  # a call cut short still returns what a minute before had
packer=$!

if [[ "$STAGES" == *multi30k* ]]; then
  # CUDA MPS lets the ten small training processes run kernels side by side; without it they take turns.
  mps=""
  if command -v nvidia-cuda-mps-control > /dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if nvidia-cuda-mps-control -d && timeout 45 python3 -c "import torch; print((torch.ones(2, device='cuda') * 3).sum().item())"; then
      mps="on"
    else
      echo quit | timeout 10 nvidia-cuda-mps-control
      unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    fi
  fi
  say "multi30k: ${TRAIN_S} s per run, MPS ${mps:-off}"
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 > "$WORK/gpu_utilisation.csv" 2>&1 &
  monitor=$!
  OMP_NUM_THREADS=1 bash benchmarks/multi30k_gpu.sh "$DATA" "$WORK/multi30k" "$TRAIN_S" 2>&1 | tee -a "$LOG"
  kill "$monitor" 2> /dev/null
  if [ -n "$mps" ]; then
    echo quit | timeout 10 nvidia-cuda-mps-control
    sleep 2
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  fi
  pack
fi
for stage in new profiles graphs eager tests compiled; do
  if [[ "$STAGES" == *$stage* ]]; then
    say "benchmarks: $stage"
    bash benchmarks/gpu_check.sh "$stage" "$WORK/bench" 2>&1 | tee -a "$LOG"
    pack
  fi
done
say "done"
pkill -P "$packer" 2> /dev/null; kill "$packer" 2> /dev/null
wait "$packer" 2> /dev/null
rm -f "$OUT"/.results.tar.gz.*  # what a packer stopped mid-write left
pack
