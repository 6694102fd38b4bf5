"""Validation during training: loss on the validation pairs, BLEU/chrF of beam-search translations,
and early stopping on one chosen metric.

Both measurements run the model in eval mode (no dropout) under `torch.no_grad` and put it back in
train mode afterwards; neither draws from the global random generators unless decoding samples.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from tformer.config import DecodeConfig, ExperimentConfig
from tformer.data.batching import Batch
from tformer.data.tokenizer import Tokenizer
from tformer.evaluation import Scores, score
from tformer.model.modes import evaluating
from tformer.training.loss import label_smoothed_loss
from tformer.training.step import autocast_context


@torch.no_grad()
def validation_loss(
    model: nn.Module,
    batches: Sequence[Batch],
    *,
    smoothing: float,
    pad_id: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> dict[str, float]:
    """valid_loss (label-smoothed), valid_nll and valid_ppl = exp(valid_nll), each per target token of
    the whole set. Perplexity comes from the NLL: the smoothed loss cannot fall below the entropy of the
    smoothed targets (training/loss.py), so a perfect model would still score above 0 on it."""
    with evaluating(model):
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        nll_sum = torch.zeros((), device=device, dtype=torch.float64)
        tokens = 0
        for batch in batches:
            on_device = batch.to(device)
            with autocast_context(device, autocast_dtype):
                logits_BTV = model(on_device.src_ids, on_device.tgt_in)
            sums = label_smoothed_loss(logits_BTV, on_device.tgt_out, smoothing=smoothing, pad_id=pad_id)
            loss_sum += sums.loss_sum
            nll_sum += sums.nll_sum
            tokens += batch.n_tgt_tokens
    nll = nll_sum.item() / tokens
    perplexity = math.exp(min(nll, 700.0))  # math.exp overflows past 709; a diverged model's ppl stays a number
    return {"valid_loss": loss_sum.item() / tokens, "valid_nll": nll, "valid_ppl": perplexity}


@torch.no_grad()
def validation_scores(
    model: nn.Module,
    tokenizer: Tokenizer,
    sources: Sequence[str],
    references: Sequence[str],
    *,
    decode: DecodeConfig,
    device: torch.device,
    max_batch_tokens: int,
    tokenize: str = "13a",
) -> Scores:
    """BLEU (sacreBLEU's `tokenize`) and chrF of the model's translations of `sources` (beam search as
    `decode` says)."""
    from tformer.decoding.pipeline import Translator  # decoding imports training-free modules only

    # Translator decodes in eval mode and gives every module its mode back afterwards
    translator = Translator(model, tokenizer, decode, device=device, max_batch_tokens=max_batch_tokens)
    hypotheses = translator.translate_texts(list(sources))
    return score(hypotheses, list(references), tokenize=tokenize)


# Decoding settings that change how fast validation translates, never what: a change of them on resume
# keeps early stopping's best BLEU/chrF (nbest: validation scores the best hypothesis alone).
SPEED_ONLY_DECODE_SETTINGS = ("static_step", "compile_step", "nbest")


def metric_settings(metric: str, experiment: ExperimentConfig) -> dict[str, Any]:
    """The settings that `metric` (loss | bleu | chrf) as validation measures it depends on, by
    "section.key": a resume that changes one of them measures it another way, so the best value so far
    no longer compares (a loss with other label smoothing, a BLEU of other beams or tokenisation)."""
    train = experiment.train
    if metric == "loss":
        return {"train.label_smoothing": train.label_smoothing}
    settings: dict[str, Any] = {"train.bleu_max_sentences": train.bleu_max_sentences}
    if metric == "bleu":
        settings["train.bleu_tokenize"] = train.bleu_tokenize
    for setting in fields(experiment.decode):
        if setting.name not in SPEED_ONLY_DECODE_SETTINGS:
            settings[f"decode.{setting.name}"] = getattr(experiment.decode, setting.name)
    return json.loads(json.dumps(settings))  # tuples as lists: as a checkpoint's trainer state gives them back


@dataclass
class EarlyStopping:
    """Best value of `metric` so far and how many evaluations in a row failed to beat it, and the settings
    it was measured with (`metric_settings`)."""

    metric: str  # bleu | chrf | loss (higher is better for bleu and chrf)
    patience: int  # stop after this many evaluations without improvement; 0 never stops
    measured_with: dict[str, Any] = field(default_factory=dict)
    best: float | None = None
    best_step: int = 0
    bad_evaluations: int = 0

    def update(self, value: float, step: int) -> bool:
        """Record a new measurement; True if it is the best so far. A NaN or infinite one (a diverged model's
        loss) never is: as the first measurement it became the best, which no later value beat (NaN
        compares false), and `best` named the checkpoint of a broken model."""
        better = math.isfinite(value) and (
            self.best is None
            or (self.metric == "loss" and value < self.best)
            or (self.metric != "loss" and value > self.best)
        )
        if better:
            self.best, self.best_step, self.bad_evaluations = value, step, 0
        else:
            self.bad_evaluations += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evaluations >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "measured_with": self.measured_with,
            "best": self.best,
            "best_step": self.best_step,
            "bad_evaluations": self.bad_evaluations,
        }

    def load_state_dict(self, state: dict[str, Any]) -> str | None:
        """Restore the state of the same metric measured the same way and return None. A state of another
        metric (a resume with a new train.stop_metric), or of this one measured with other settings (a
        resume with --set train.label_smoothing=0 under the loss, decode.beam_size=1 under BLEU), says
        nothing about the values to come: start afresh and return why, in one line. A state without a
        metric's name, or its settings, counts as this metric's, measured this way (a resume of an older
        checkpoint's fills them in from its experiment.json first: trainer_state._stopping_state_named)."""
        stored = str(state.get("metric", self.metric))
        if stored != self.metric:
            self.best, self.best_step, self.bad_evaluations = None, 0, 0
            return (
                f"train.stop_metric changed from {stored} to {self.metric}: early stopping starts afresh "
                f"(the best {stored} so far does not count)"
            )
        before = state.get("measured_with") or {}
        changed = [key for key, value in self.measured_with.items() if key in before and before[key] != value]
        if changed:
            self.best, self.best_step, self.bad_evaluations = None, 0, 0
            best = "none yet" if state["best"] is None else f"{float(state['best']):.4g} at step {state['best_step']}"
            return (
                f"{', '.join(changed)} changed since the best {self.metric} so far ({best}) was measured: early "
                "stopping starts afresh, comparing only values measured the new way"
            )
        self.best = None if state["best"] is None else float(state["best"])
        self.best_step, self.bad_evaluations = int(state["best_step"]), int(state["bad_evaluations"])
        if self.best is not None and not math.isfinite(self.best):  # saved before `update` refused one: unset
            self.best, self.best_step, self.bad_evaluations = None, 0, 0
        return None
