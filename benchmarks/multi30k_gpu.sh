#!/usr/bin/env bash
# Multi30k on one GPU: three recipes in each direction and the four one-change ablations, trained side
# by side (ten processes sharing one GPU, each with the same wall-clock budget), then every run scored on
# test2016. Selection is by validation BLEU; test2016 is only reported.
#   bash benchmarks/multi30k_gpu.sh DATA_DIR DEST [TRAIN_SECONDS]
# DATA_DIR holds train/val/test2016 .en/.de; DEST receives logs, metrics.jsonl files and scores (JSON);
# the checkpoints go to $RUNS_DIR (default /tmp/m30k-runs). VARIANTS="en-de-reg de-en-reg ..." runs only
# those (fewer runs share the GPU, so each takes more steps). DECODE_SWEEP="4:0.6 6:1.0" also scores every
# recipe run's best and averaged checkpoints with those beam:alpha settings on val and test, and names the
# setting validation BLEU chooses. EXTRA_SET adds --set flags to every run and
# TEST_LINES cuts the test sets (both for a quick CPU rehearsal of this script).
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
# them configs/multi30k_*.toml hold (en_de: small, de_en: reg, the winners on validation BLEU).
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
train en-de-small configs/multi30k_en_de.toml "${small[@]}"
train en-de-tiny configs/multi30k_en_de.toml "${tiny[@]}"
train en-de-reg configs/multi30k_en_de.toml "${reg[@]}"
train de-en-small configs/multi30k_de_en.toml "${small[@]}"
train de-en-tiny configs/multi30k_de_en.toml "${tiny[@]}"
train de-en-reg configs/multi30k_de_en.toml "${reg[@]}"
train en-de-small-no-smoothing configs/multi30k_en_de.toml "${small[@]}" --set train.label_smoothing=0.0
train en-de-small-no-warmup configs/multi30k_en_de.toml "${small[@]}" --set train.warmup_ramp=false
train en-de-small-pre-norm configs/multi30k_en_de.toml "${small[@]}" --set model.norm_position=pre
train en-de-small-learned-positions configs/multi30k_en_de.toml "${small[@]}" --set model.positional_encoding=learned
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

score_run() {  # score_run NAME FULL: best (beam 4) on test; FULL adds last, greedy and the average
  local name="$1" full="$2" src tgt
  src="${name%%-*}"; tgt="${name#*-}"; tgt="${tgt%%-*}"
  [ -d "$RUNS/$name" ] || return 0
  cp "$RUNS/$name/metrics.jsonl" "$DEST/$name.metrics.jsonl" 2>/dev/null
  evaluate "$RUNS/$name" "$src" "$tgt" test2016 "$DEST/$name.best.test.json" --which best
  [ "$full" = full ] || return 0
  evaluate "$RUNS/$name" "$src" "$tgt" test2016 "$DEST/$name.last.test.json" --which last
  evaluate "$RUNS/$name" "$src" "$tgt" test2016 "$DEST/$name.best-greedy.test.json" --which best --beam 1
  if "$PY" -m tformer.cli.main average "$RUNS/$name" --last 5 --out "$RUNS/$name.avg5" >> "$DEST/evaluate.log" 2>&1; then
    evaluate "$RUNS/$name.avg5" "$src" "$tgt" test2016 "$DEST/$name.avg5.test.json"
    evaluate "$RUNS/$name.avg5" "$src" "$tgt" val "$DEST/$name.avg5.val.json"
  fi
  local setting beam alpha
  for setting in ${DECODE_SWEEP:-}; do  # e.g. "4:0.6 4:1.0 6:1.0": beam:alpha, each on val and test
    beam="${setting%%:*}"; alpha="${setting#*:}"
    for split in val test2016; do
      evaluate "$RUNS/$name" "$src" "$tgt" "$split" "$DEST/$name.best-b${beam}a${alpha}.${split%2016}.json" \
        --which best --beam "$beam" --length-penalty "$alpha"
      [ -d "$RUNS/$name.avg5" ] && evaluate "$RUNS/$name.avg5" "$src" "$tgt" "$split" \
        "$DEST/$name.avg5-b${beam}a${alpha}.${split%2016}.json" --beam "$beam" --length-penalty "$alpha"
    done
  done
}

for name in en-de-small en-de-tiny en-de-reg de-en-small de-en-tiny de-en-reg; do score_run "$name" full & done
for name in en-de-small-no-smoothing en-de-small-no-warmup en-de-small-pre-norm en-de-small-learned-positions; do
  score_run "$name" best &
done
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
# Decoding settings chosen on validation BLEU (DECODE_SWEEP): per run, the val-best checkpoint/setting's test.
by_run = {}
for path in dest.glob("*-b*a*.val.json"):
    run, setting = path.name[: -len(".val.json")].split(".", 1)
    by_run.setdefault(run, []).append((json.loads(path.read_text())["bleu"], setting))
for run, options in sorted(by_run.items()):
    val_bleu, setting = max(options)
    test = json.loads((dest / f"{run}.{setting}.test.json").read_text())
    print(f"{run}: chosen on val {setting} (val BLEU {val_bleu:.2f}) -> test BLEU {test['bleu']:.2f} "
          f"lc {test['bleu_lowercase']:.2f} chrF {test['chrf']:.2f}")
for path in sorted(dest.glob("*.metrics.jsonl")):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    bleu = [(r["bleu"], r["step"]) for r in rows if "bleu" in r]
    speed = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    print(f"{path.name:45s} steps {rows[-1]['step']:6d} epochs {rows[-1]['epoch']:4d} wall {rows[-1]['wall_s']:6.0f} s"
          f"  best val BLEU {max(bleu, default=(0, 0))}  median tok/s {sorted(speed)[len(speed) // 2] if speed else 0:.0f}")
PY
