#!/usr/bin/env bash
# The GPU speed benchmarks of benchmarks/train.py and benchmarks/decode.py, in order of importance.
#   bash benchmarks/gpu_check.sh new|profiles|graphs|eager|tests|compiled|all [DEST]
# new: session 21's runs (records *_session21.md): the graphed step recording the objective compiled whole
#        (`--graph --compile model`) against Marian compiled whole, base 512x64x64, then the GPU tests (the
#        compiled objective inside the graph among them), then the same at 128x64x64, that step's kernel
#        profile, and both batches against Marian eager (--rivals-compile none); about 10 minutes;
# profiles: the kernel profile of the graphed step with compiled layers (base 512x64x64, against HF
#        compiled), the compiled decoding step on `base` again (a second measurement of session 14's 51.5k),
#        then the compiled beam-4 step's kernel profile and `small`; about 9-11 minutes (compile times);
# graphs: the CUDA-graph runs measured in sessions 3 and 13 again (compiled static decoding step, graphed
#        training step with compiled layers, default and static decoding steps, graphed eager step), ~15 min;
# eager: training base 512x64x64 and 128x64x64, small 128x64x64 (tformer, HF Marian, nn.Transformer) and
#        decoding base and small (tformer, HF generate), about 4 minutes on one H200;
# compiled: training base 512x64x64 with the whole model compiled (CUDA graphs), then base 512x64x64 and
#        128x64x64 with per-layer torch.compile (tformer, HF), and the chunked loss, about 5 minutes.
# The --profile runs print the top CUDA kernels of each system into their .log files (where the time goes).
# JSON lines, logs and markdown records go to DEST (default $OUT, else benchmarks/results). A benchmark
# that could not finish before $DEADLINE (epoch seconds, if set) is skipped and says so; SKIP="NAME ..."
# skips benchmarks by name (those a first call already ran).
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE="${1:-all}"
DEST="${2:-${OUT:-benchmarks/results}}"
PY="${PYTHON:-python3}"
DEADLINE="${DEADLINE:-0}"
STAMP="$(date -u +%Y-%m-%d)"
mkdir -p "$DEST"

run() {  # run NAME LIMIT_SECONDS SCRIPT ARGS...
  local name="$1" limit="$2"; shift 2
  if [[ " ${SKIP:-} " == *" $name "* ]]; then echo "-- $name skipped (SKIP)"; return; fi
  if [ "$DEADLINE" -gt 0 ] && [ $(( $(date +%s) + limit )) -gt "$DEADLINE" ]; then
    echo "-- $name skipped: it may need ${limit} s and the deadline is $(( DEADLINE - $(date +%s) )) s away"
    return
  fi
  echo "== $name: $*"
  timeout "$limit" "$PY" "$@" --record "$DEST/${name}_${STAMP}.md" > "$DEST/$name.jsonl" 2> "$DEST/$name.log" \
    || echo "!! $name failed or timed out (status $?): $(tail -n 1 "$DEST/$name.log")"
  "$PY" - "$DEST/$name.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    row = json.loads(line)
    if row["metric"] in ("tokens_per_s", "mfu", "peak_memory_mb", "compile_s") or row["metric"].startswith("ratio"):
        keys = ("system", "beam", "metric", "value")
        print("  ", " ".join(f"{row[k]:.4g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys))
    elif row["metric"] == "target_tokens_per_s" and "beam" in row:
        print("  ", row["system"], "beam", row["beam"], "target_tokens_per_s", f"{row['value']:.0f}")
PY
}

train=(benchmarks/train.py --device cuda --repeats 3)
if [ "$STAGE" = new ] || [ "$STAGE" = all ]; then  # what no GPU has run yet, most telling first
  run train_cuda_base_512x64x64_graph_compiled_model 240 "${train[@]}" --preset base --batch 512x64x64 --steps 10 --graph --compile model --systems tformer,hf
  if [ "$DEADLINE" -eq 0 ] || [ $(( $(date +%s) + 240 )) -le "$DEADLINE" ]; then
    echo "== pytest: every GPU test (CUDA graphs of decoding and training steps, the compiled objective recorded, no host sync in a DDP step)"
    timeout 240 "$PY" -m pytest -o addopts="" -q -rfE -p no:cacheprovider tests/test_graphed_step.py tests/test_static_step.py \
      tests/test_training_step.py tests/test_top_k.py -k "(cuda or gpu) and not cpu" -p no:logging 2>&1 \
      | grep -v "Warning:\|warnings.warn(\|^DEBUG" | tail -n 60
  else
    echo "-- pytest skipped: the deadline is $(( DEADLINE - $(date +%s) )) s away"
  fi
  run train_cuda_base_128x64x64_graph_compiled_model 150 "${train[@]}" --preset base --batch 128x64x64 --steps 20 --graph --compile model --systems tformer,hf
  run train_cuda_base_512x64x64_graph_compiled_model_profile 200 "${train[@]}" --preset base --batch 512x64x64 --steps 10 --graph --compile model --systems tformer --profile
  run train_cuda_base_128x64x64_graph_compiled_model_vs_hf_eager 130 "${train[@]}" --preset base --batch 128x64x64 --steps 20 --graph --compile model --rivals-compile none --systems tformer,hf
  run train_cuda_base_512x64x64_graph_compiled_model_vs_hf_eager 130 "${train[@]}" --preset base --batch 512x64x64 --steps 10 --graph --compile model --rivals-compile none --systems tformer,hf
fi
if [ "$STAGE" = profiles ] || [ "$STAGE" = all ]; then  # measured by no GPU yet either (prepared in session 15)
  run train_cuda_base_512x64x64_graph_compiled_profile 220 "${train[@]}" --preset base --batch 512x64x64 --steps 10 --graph --compile --systems tformer,hf --profile
  run decode_cuda_base_compiled 240 benchmarks/decode.py --device cuda --preset base --sentences 256 --systems tformer,hf --compile-step
  run decode_cuda_base_compiled_beam4_profile 200 benchmarks/decode.py --device cuda --preset base --sentences 256 --beams 4 --systems tformer --compile-step --profile
  run decode_cuda_small_compiled 200 benchmarks/decode.py --device cuda --preset small --sentences 256 --systems tformer,hf --compile-step
fi
if [ "$STAGE" = graphs ] || [ "$STAGE" = all ]; then  # the CUDA-graph runs measured before (sessions 3 and 13)
  run decode_cuda_base_compiled 240 benchmarks/decode.py --device cuda --preset base --sentences 256 --systems tformer,hf --compile-step
  run train_cuda_base_512x64x64_graph_compiled 200 "${train[@]}" --preset base --batch 512x64x64 --steps 10 --graph --compile --systems tformer,hf
  run train_cuda_base_128x64x64_graph_compiled 150 "${train[@]}" --preset base --batch 128x64x64 --steps 20 --graph --compile --systems tformer,hf
  run decode_cuda_base_beam_cache 120 benchmarks/decode.py --device cuda --preset base --sentences 256 --systems tformer,hf
  run decode_cuda_base_static 120 benchmarks/decode.py --device cuda --preset base --sentences 256 --systems tformer,hf --static-step
  run train_cuda_base_128x64x64_graph 60 "${train[@]}" --preset base --batch 128x64x64 --steps 20 --graph --systems tformer,hf
  run train_cuda_base_512x64x64_graph 80 "${train[@]}" --preset base --batch 512x64x64 --steps 10 --graph --systems tformer,hf
  run decode_cuda_small_static 90 benchmarks/decode.py --device cuda --preset small --sentences 256 --systems tformer,hf --static-step
fi
if [ "$STAGE" = eager ] || [ "$STAGE" = all ]; then
  run train_cuda_base_512x64x64 100 "${train[@]}" --preset base --batch 512x64x64 --steps 10 --profile
  run decode_cuda_base 120 benchmarks/decode.py --device cuda --preset base --sentences 256 --systems tformer,hf
  run train_cuda_base_128x64x64 80 "${train[@]}" --preset base --batch 128x64x64 --steps 20
  run train_cuda_small_128x64x64 80 "${train[@]}" --preset small --batch 128x64x64 --steps 20
  run decode_cuda_small 100 benchmarks/decode.py --device cuda --preset small --sentences 256 --systems tformer,hf
fi
if [ "$STAGE" = tests ] || [ "$STAGE" = all ]; then  # the tests that only run on a GPU
  echo "== pytest (GPU tests)"
  timeout 300 "$PY" -m pytest -o addopts="" -q -rfE -p no:cacheprovider tests/test_static_step.py tests/test_distributed.py 2>&1 | tail -n 8
fi
if [ "$STAGE" = compiled ] || [ "$STAGE" = all ]; then
  run train_cuda_base_512x64x64_compiled_model 200 "${train[@]}" --preset base --batch 512x64x64 --steps 10 --compile model --systems tformer,hf
  run train_cuda_base_512x64x64_compiled 200 "${train[@]}" --preset base --batch 512x64x64 --steps 10 --compile --systems tformer,hf
  run train_cuda_base_128x64x64_compiled 150 "${train[@]}" --preset base --batch 128x64x64 --steps 20 --compile --systems tformer,hf
  run train_cuda_base_512x64x64_chunk1024 60 "${train[@]}" --preset base --batch 512x64x64 --steps 10 --loss-chunk 1024 --systems tformer
fi
