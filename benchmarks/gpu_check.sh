#!/usr/bin/env bash
# GPU checks that a CPU-only session could not run; about 6-8 minutes on one H100/H200.
# Writes JSON lines (and the markdown records) under $OUT when it is set, else benchmarks/results/.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-benchmarks/results}"
mkdir -p "$DEST"
STAMP="$(date -u +%Y-%m-%d)"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$DEST/gpu.txt"

run() {  # run NAME COMMAND... : JSON lines to $DEST/NAME.jsonl, the log to $DEST/NAME.log
  local name="$1"; shift
  echo "== $name: $*" | tee -a "$DEST/gpu_check.log"
  timeout 240 "$@" --record "$DEST/${name}_${STAMP}.md" > "$DEST/$name.jsonl" 2> "$DEST/$name.log" \
    || echo "!! $name failed or timed out (status $?)" | tee -a "$DEST/gpu_check.log"
  grep -h '"ratio_vs\|"mfu"\|tokens_per_s"' "$DEST/$name.jsonl" | grep -v target_ | tee -a "$DEST/gpu_check.log"
}

# Training: tformer vs HF Marian and nn.Transformer, bf16 autocast, eager then per-layer compiled.
for preset in small base; do
  for batch in 128x64x64 512x64x64; do
    run "train_cuda_${preset}_${batch}_eager" python benchmarks/train.py --device cuda --preset "$preset" --batch "$batch" --steps 10 --repeats 3
  done
  run "train_cuda_${preset}_128x64x64_compiled" python benchmarks/train.py --device cuda --preset "$preset" --batch 128x64x64 --steps 10 --repeats 3 --compile --systems tformer,hf
done
# Chunked loss: same speed class, lower peak memory (compare peak_memory_mb with the eager base run).
run "train_cuda_base_512x64x64_chunk1024" python benchmarks/train.py --device cuda --preset base --batch 512x64x64 --steps 10 --repeats 3 --loss-chunk 1024 --systems tformer
# Decoding.
run "decode_cuda_base" python benchmarks/decode.py --device cuda --preset base
# The GPU-only paths of the Trainer (bf16 autocast, pinned background prefetch, fused AdamW, chunked loss,
# compiled layers) on a tiny run, then the CPU tests of this work.
timeout 180 python - > "$DEST/trainer_cuda.log" 2>&1 <<'PY' || echo "!! cuda Trainer run failed" | tee -a "$DEST/gpu_check.log"
import sys, tempfile
from pathlib import Path
sys.path.insert(0, "tests")
from training_helpers import tiny_experiment, write_corpus
from tformer.training import start_run
with tempfile.TemporaryDirectory() as tmp:
    corpus = write_corpus(Path(tmp))
    for chunk, compiled in ((0, False), (64, True)):
        experiment = tiny_experiment(corpus, "train.device='cuda'", "train.max_steps=30", "train.valid_every=10")
        result = start_run(experiment, Path(tmp) / f"run{chunk}", loss_chunk=chunk, compile_model=compiled).train()
        print("cuda trainer ok", chunk, compiled, result.step, result.best_metric)
PY
tail -n 2 "$DEST/trainer_cuda.log" | tee -a "$DEST/gpu_check.log"
timeout 120 python -m pytest tests/test_distributed.py tests/test_compile.py tests/test_chunked_loss.py -q \
  > "$DEST/pytest.log" 2>&1 || echo "!! pytest failed" | tee -a "$DEST/gpu_check.log"
tail -n 3 "$DEST/pytest.log" | tee -a "$DEST/gpu_check.log"
