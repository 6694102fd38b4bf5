"""Validation as the Trainer runs it: the measurements due at a step (validation.py computes them) on
the run's validation set, the early-stopping update they feed, and rank 0's numbers on every process.

Every process validates the same sentences on the same weights, but kernels need not give bit-identical
results on different GPUs, and early stopping must decide alike everywhere: a process that stops alone
leaves the others waiting in a collective. So every process measures, then takes rank 0's numbers (one
small broadcast).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from tformer.config import ExperimentConfig
from tformer.data.batching import Batch
from tformer.data.tokenizer import Tokenizer
from tformer.decoding.constraints import check_banned_ids
from tformer.evaluation import Scores, bleu_metric, reference_advice
from tformer.runtime import Distributed
from tformer.training.progress import Progress
from tformer.training.validation import EarlyStopping, validation_loss, validation_scores


class Validator:
    def __init__(
        self,
        *,
        experiment: ExperimentConfig,
        model: nn.Module,
        tokenizer: Tokenizer,
        batches: list[Batch],
        sources: list[str],
        references: list[str],
        early_stopping: EarlyStopping,
        distributed: Distributed,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
    ) -> None:
        """`batches` for the validation loss, `sources` and `references` (raw text) for BLEU/chrF;
        `early_stopping` is the Trainer's, which its checkpoints keep."""
        self.experiment, self.config = experiment, experiment.train
        self.model, self.tokenizer = model, tokenizer
        self.batches, self.sources, self.references = batches, sources, references
        self.early_stopping = early_stopping
        self.distributed, self.device, self.autocast_dtype = distributed, device, autocast_dtype
        self._shown_signature = False
        if self.config.bleu_every > 0 and references:
            bleu_metric(self.config.bleu_tokenize)  # a missing MeCab fails now, not at the first BLEU
        # a banned id out of range neither: the first BLEU would fail on it, and every checkpoint keeps it
        check_banned_ids(experiment.decode, model.config.tgt_vocab_size)

    def run(self, step: int, progress: Progress, *, before: Callable[[], object]) -> tuple[dict[str, float], bool]:
        """The validation due at `step` (every train.valid_every and train.bleu_every steps), after calling
        `before` (which reads the pending training losses); returns its metrics row ({} when none was due)
        and whether the stopping metric reached a new best."""
        config, row, improved = self.config, {}, False
        if not self.batches:
            return row, improved
        if step % config.valid_every == 0:
            before()
            row.update(self.loss())
            if config.stop_metric == "loss":
                improved = self.early_stopping.update(row["valid_loss"], step)
        if config.bleu_every > 0 and step % config.bleu_every == 0:
            before()
            scores = self.scores()
            row.update(bleu=scores.bleu, bleu_lowercase=scores.bleu_lowercase, chrf=scores.chrf)
            if not self._shown_signature:
                self._show_signature(scores, progress)
            if config.stop_metric in ("bleu", "chrf"):
                improved = self.early_stopping.update(row[config.stop_metric], step)
        return row, improved

    def loss(self) -> dict[str, float]:
        """Rank 0's validation loss, on every process."""
        measured = validation_loss(
            self.model,
            self.batches,
            smoothing=self.config.label_smoothing,
            pad_id=self.tokenizer.pad_id,
            device=self.device,
            autocast_dtype=self.autocast_dtype,
        )
        return dict(zip(measured, self.distributed.broadcast_floats(list(measured.values()), self.device), strict=True))

    def scores(self) -> Scores:
        """Rank 0's BLEU and chrF, on every process."""
        scores = self._own_scores()
        bleu, bleu_lowercase, chrf = self.distributed.broadcast_floats(
            [scores.bleu, scores.bleu_lowercase, scores.chrf], self.device
        )
        return replace(scores, bleu=bleu, bleu_lowercase=bleu_lowercase, chrf=chrf)

    def _own_scores(self) -> Scores:
        limit = self.config.bleu_max_sentences
        return validation_scores(
            self.model,
            self.tokenizer,
            self.sources[:limit],
            self.references[:limit],
            decode=self.experiment.decode,
            device=self.device,
            max_batch_tokens=self.config.max_tokens,
            tokenize=self.config.bleu_tokenize,
        )

    def _show_signature(self, scores: Scores, progress: Progress) -> None:
        """The sacreBLEU signatures, once per run, and advice when the tokenization does not suit the text."""
        progress.message(f"validation BLEU signature: {scores.bleu_signature}")
        progress.message(f"validation chrF signature: {scores.chrf_signature}")
        references = self.references[: self.config.bleu_max_sentences]
        for line in reference_advice(list(references), self.config.bleu_tokenize, self.tokenizer):
            progress.message(f"warning: {line}")
        self._shown_signature = True


def validation_line(step: int, row: dict[str, float], improved: bool) -> str:
    """The line that shows a step's validation row (BLEU, chrF and the valid_ metrics, to 3 decimals)."""
    shown = {key: round(value, 3) for key, value in row.items() if key.startswith("valid_") or key in ("bleu", "chrf")}
    return f"step {step} validation: {shown}{' (best)' if improved else ''}"
