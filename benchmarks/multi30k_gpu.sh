#!/usr/bin/env bash
# Multi30k on one GPU: three recipes in each direction, the reg recipe again with another seed (and once
# with train.cuda_graphs), and the four one-change ablations, trained side by side (processes sharing one
# GPU, each with the same wall-clock budget), then scored. Selection is by validation BLEU; test2016 is only reported.
#   bash benchmarks/multi30k_gpu.sh DATA_DIR DEST [TRAIN_SECONDS]
# DATA_DIR holds train/val/test2016 .en/.de; DEST receives logs, metrics.jsonl files and scores (JSON);
# the checkpoints go to $RUNS_DIR (default /tmp/m30k-runs). VARIANTS="en-de-reg de-en-reg ..." runs only
# those (fewer runs share the GPU, so each takes more steps). Every recipe run is scored on test2016 (best
# checkpoint, last, greedy, average of the last 5 on val too); DECODE_SWEEP="4:1.0 6:1.0" adds those
# beam:alpha settings on val and test; the two seeds of a reg recipe are also decoded as an ensemble
# (evaluate --ensemble). The summary names, per direction, the candidate validation BLEU chooses (and the
# best single model). PARALLEL evaluations run at once (default 8). EXTRA_SET adds --set flags to every
# run and TEST_LINES cuts the test sets (both for a quick CPU rehearsal of this script).
set -uo pipefail
cd "$(dirname "$0")/.."
DATA="${1:?data directory}"
DEST="${2:?output directory}"
TRAIN_S="${3:-300}"
RUNS="${RUNS_DIR:-/tmp/m30k-runs}"
PY="${PYTHON:-python3}"
read -r -a EXTRA <<< "${EXTRA_SET:-}"
mkdir -p "$DEST" "$RUNS"

# Each variant states every setting in which the recipes differ, so the sweep does not depend on which of
# them the recipes multi30k_en_de and multi30k_de_en (src/tformer/configs/) hold (both the reg recipe, the
# winner on validation BLEU).
small=(--set model.attention_dropout=0.0 --set model.activation_dropout=0.0 --set train.max_tokens=8192)
tiny=(--set model.d_model=128 --set model.d_ff=256 --set model.n_encoder_layers=4 --set model.n_decoder_layers=4
      --set model.attention_dropout=0.0 --set model.activation_dropout=0.0
      --set train.max_tokens=4096 --set train.peak_lr=5e-3 --set train.warmup_steps=2000)
reg=(--set model.attention_dropout=0.1 --set model.activation_dropout=0.1 --set train.max_tokens=4096)

train() {  # train NAME CONFIG ARGS...: one run in the background (if VARIANTS is unset or names it)
  local name="$1" config="$2"; shift 2
  [ -z "${VARIANTS:-}" ] || [[ " $VARIANTS " == *" $name "* ]] || return 0
  timeout $((TRAIN_S + 300)) "$PY" -m tformer.cli.main train --config "$config" --data-dir "$DATA" \
    --out "$RUNS/$name" --max-time "$TRAIN_S" --quiet "$@" "${EXTRA[@]}" \
    > "$DEST/$name.train.log" 2>&1 &
}

started=$(date +%s)
train en-de-small multi30k_en_de "${small[@]}"
train en-de-tiny multi30k_en_de "${tiny[@]}"
train en-de-reg multi30k_en_de "${reg[@]}"
train de-en-small multi30k_de_en "${small[@]}"
train de-en-tiny multi30k_de_en "${tiny[@]}"
train de-en-reg multi30k_de_en "${reg[@]}"
# the same recipes with another seed (initialisation, dropout, batch order; the tokenizer is the same),
# for the ensembles of two runs (ENSEMBLES below)
train en-de-reg-seed2 multi30k_en_de "${reg[@]}" --set train.seed=2
train de-en-reg-seed2 multi30k_de_en "${reg[@]}" --set train.seed=2
# the reg recipe trained with CUDA graphs (train.cuda_graphs): steps and quality in the same time
train en-de-reg-graphs multi30k_en_de "${reg[@]}" --set train.cuda_graphs=true
train en-de-small-no-smoothing multi30k_en_de "${small[@]}" --set train.label_smoothing=0.0
train en-de-small-no-warmup multi30k_en_de "${small[@]}" --set train.warmup_ramp=false
train en-de-small-pre-norm multi30k_en_de "${small[@]}" --set model.norm_position=pre
train en-de-small-learned-positions multi30k_en_de "${small[@]}" --set model.positional_encoding=learned
wait
echo "training wall time (all runs, side by side, tokenizers included): $(( $(date +%s) - started )) s"

# Test sets (optionally cut for a rehearsal).
TEST="$DEST/.test"
mkdir -p "$TEST"
for side in en de; do
  for split in test2016 val; do head -n "${TEST_LINES:-1000000}" "$DATA/$split.$side" > "$TEST/$split.$side"; done
done

evaluate() {  # evaluate RUN_OR_CHECKPOINT SRC TGT SPLIT OUT_JSON ARGS...
  local target="$1" src="$2" tgt="$3" split="$4" out="$5"; shift 5
  "$PY" -m tformer.cli.main evaluate "$target" --src "$TEST/$split.$src" --ref "$TEST/$split.$tgt" --json "$@" \
    > "$out" 2>> "$DEST/evaluate.log" || echo "!! evaluate $target $* failed" >> "$DEST/evaluate.log"
}

queue() {  # queue COMMAND...: run in the background, at most $PARALLEL (default 8) at a time
  while [ "$(jobs -rp | wc -l)" -ge "${PARALLEL:-8}" ]; do wait -n; done
  "$@" &
}

pair() {  # pair NAME: the source and target language of a run name (en-de-...)
  local tgt="${1#*-}"
  echo "${1%%-*} ${tgt%%-*}"
}

score_run() {  # score_run NAME LEVEL: best (beam 4) on test; select adds the average of the last 5 on
  # val and test and the DECODE_SWEEP settings; full adds the last checkpoint and greedy decoding
  local name="$1" level="$2" src tgt setting beam alpha
  read -r src tgt <<< "$(pair "$name")"
  [ -d "$RUNS/$name" ] || return 0
  cp "$RUNS/$name/metrics.jsonl" "$DEST/$name.metrics.jsonl" 2>/dev/null
  queue evaluate "$RUNS/$name" "$src" "$tgt" test2016 "$DEST/$name.best.test.json" --which best
  [ "$level" = best ] && return 0
  if [ -d "$RUNS/$name.avg5" ]; then
    queue evaluate "$RUNS/$name.avg5" "$src" "$tgt" test2016 "$DEST/$name.avg5.test.json"
    queue evaluate "$RUNS/$name.avg5" "$src" "$tgt" val "$DEST/$name.avg5.val.json"
  fi
  for setting in ${DECODE_SWEEP:-}; do  # e.g. "4:1.0 6:1.0": beam:alpha, each on val and test
    beam="${setting%%:*}"; alpha="${setting#*:}"
    for split in val test2016; do
      queue evaluate "$RUNS/$name" "$src" "$tgt" "$split" "$DEST/$name.best-b${beam}a${alpha}.${split%2016}.json" \
        --which best --beam "$beam" --length-penalty "$alpha"
      [ -d "$RUNS/$name.avg5" ] && queue evaluate "$RUNS/$name.avg5" "$src" "$tgt" "$split" \
        "$DEST/$name.avg5-b${beam}a${alpha}.${split%2016}.json" --beam "$beam" --length-penalty "$alpha"
    done
  done
  [ "$level" = full ] || return 0
  queue evaluate "$RUNS/$name" "$src" "$tgt" test2016 "$DEST/$name.last.test.json" --which last
  queue evaluate "$RUNS/$name" "$src" "$tgt" test2016 "$DEST/$name.best-greedy.test.json" --which best --beam 1
}

score_ensemble() {  # score_ensemble FIRST SECOND: the two runs' best checkpoints, and their averages, decoded
  # together (evaluate --ensemble), on val and test
  local first="$1" second="$2" src tgt split
  read -r src tgt <<< "$(pair "$first")"
  [ -d "$RUNS/$first" ] && [ -d "$RUNS/$second" ] || return 0
  for split in val test2016; do
    queue evaluate "$RUNS/$first" "$src" "$tgt" "$split" "$DEST/$first+$second.best.${split%2016}.json" \
      --which best --ensemble "$RUNS/$second"
    [ -d "$RUNS/$first.avg5" ] && [ -d "$RUNS/$second.avg5" ] && queue evaluate "$RUNS/$first.avg5" "$src" "$tgt" \
      "$split" "$DEST/$first+$second.avg5.${split%2016}.json" --ensemble "$RUNS/$second.avg5"
  done
}

recipes="en-de-small en-de-tiny en-de-reg de-en-small de-en-tiny de-en-reg"
for name in $recipes en-de-reg-seed2 de-en-reg-seed2 en-de-reg-graphs; do  # the averages first (CPU, seconds)
  [ -d "$RUNS/$name" ] && "$PY" -m tformer.cli.main average "$RUNS/$name" --last 5 --out "$RUNS/$name.avg5" \
    >> "$DEST/evaluate.log" 2>&1
done
for name in $recipes; do score_run "$name" full; done
for name in en-de-reg-seed2 de-en-reg-seed2 en-de-reg-graphs; do score_run "$name" select; done
for name in en-de-small-no-smoothing en-de-small-no-warmup en-de-small-pre-norm en-de-small-learned-positions; do
  score_run "$name" best
done
score_ensemble en-de-reg en-de-reg-seed2
score_ensemble de-en-reg de-en-reg-seed2
wait
rm -rf "$TEST"
echo "training + scoring wall time: $(( $(date +%s) - started )) s"
"$PY" - "$DEST" <<'PY'
import json, pathlib, sys
dest = pathlib.Path(sys.argv[1])
for path in sorted(dest.glob("*.json")):
    try:
        row = json.loads(path.read_text())
    except ValueError:
        continue
    print(f"{path.stem:45s} step {row['step']:6d}  BLEU {row['bleu']:5.2f}  lc {row['bleu_lowercase']:5.2f}  chrF {row['chrf']:5.2f}")
# Selection on validation BLEU, per direction: every candidate scored on val (a run's best checkpoint, by
# the BLEU its training measured on val with the recipe's beam 4 / alpha 0.6; averages, DECODE_SWEEP
# settings, ensembles, from their .val.json) is ranked, and the winner's test2016 scores are reported; the
# best single model (no ensemble) likewise.
candidates = {}
for path in dest.glob("*.val.json"):
    name = path.name[: -len(".val.json")]
    if (dest / f"{name}.test.json").exists():
        candidates[name] = json.loads(path.read_text())["bleu"]
for path in dest.glob("*.metrics.jsonl"):
    run = path.name[: -len(".metrics.jsonl")]
    bleu = [json.loads(line).get("bleu") for line in path.read_text().splitlines()]
    bleu = [value for value in bleu if value is not None]
    if bleu and (dest / f"{run}.best.test.json").exists():
        candidates[f"{run}.best"] = max(bleu)
for direction in ("en-de", "de-en"):
    ranked = sorted(((v, n) for n, v in candidates.items() if n.startswith(direction)), reverse=True)
    singles = [(v, n) for v, n in ranked if "+" not in n]
    for label, pool in (("any", ranked), ("single model", singles)):
        if pool:
            val_bleu, name = pool[0]
            test = json.loads((dest / f"{name}.test.json").read_text())
            print(f"{direction} chosen on val ({label}): {name} (val BLEU {val_bleu:.2f}) -> test BLEU {test['bleu']:.2f} "
                  f"lc {test['bleu_lowercase']:.2f} chrF {test['chrf']:.2f}")
for path in sorted(dest.glob("*.metrics.jsonl")):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    bleu = [(r["bleu"], r["step"]) for r in rows if "bleu" in r]
    speed = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    print(f"{path.name:45s} steps {rows[-1]['step']:6d} epochs {rows[-1]['epoch']:4d} wall {rows[-1]['wall_s']:6.0f} s"
          f"  best val BLEU {max(bleu, default=(0, 0))}  median tok/s {sorted(speed)[len(speed) // 2] if speed else 0:.0f}")
PY
