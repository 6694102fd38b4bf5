"""Per-step restrictions on the next token, applied to log-probabilities before any search picks.

All of them work on whole (R, V) tensors with no host synchronisation: banned tokens get -inf, and the
log-probabilities of allowed tokens are not renormalised (as in fairseq and Hugging Face).

- banned_ids: these tokens are never predicted (Hugging Face's single-token `bad_words_ids`);
- min_len: eos is banned while fewer than `min_len` tokens have been predicted;
- no_repeat_ngram_size n: a token that would complete an n-gram already present in the history
  (bos included, as in Hugging Face) is banned;
- prefix: while a row's forced prefix lasts, every other token is banned, and the forced token keeps the
  model's log-probability even if one of the bans above would exclude it (the user asked for it);
- forced_eos: at a row's last step (its maximum length) eos is the only token, with log-probability 0
  (Hugging Face's forced_eos_token_id), whatever the other restrictions say.

Shape legend: R rows, B sentences, V vocabulary, T history length (bos + tokens so far), P longest prefix;
in the n-gram ban, W the n-grams of the history, n the n-gram size and m = n - 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tformer.config import DecodeConfig
from tformer.decoding.search_types import DecodingError


def prefix_tensor(
    prefix: list[list[int]] | None, *, n_sentences: int, rows_per_sentence: int, eos_id: int, vocab_size: int, device
) -> Tensor | None:
    """Forced first tokens per row, -1 where a sentence's prefix has ended; None without prefixes."""
    if prefix is None:
        return None
    if len(prefix) != n_sentences:
        raise DecodingError(f"prefix has {len(prefix)} entries for {n_sentences} sentences; give one list per sentence")
    longest = max((len(tokens) for tokens in prefix), default=0)
    if longest == 0:
        return None
    for tokens in prefix:
        if any(token == eos_id or not 0 <= token < vocab_size for token in tokens):
            raise DecodingError(f"prefix tokens must be in [0, {vocab_size}) and not eos ({eos_id}); got {tokens}")
    table_BP = torch.full((n_sentences, longest), -1, dtype=torch.long)
    for row, tokens in enumerate(prefix):
        table_BP[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return table_BP.repeat_interleave(rows_per_sentence, dim=0).to(device)


def check_banned_ids(config: DecodeConfig, vocab_size: int) -> None:
    """DecodeConfig knows no vocabulary: a run's or a --set's banned ids are checked against the model's
    here, by every search, and before a server or a training run starts (so neither fails on its first
    translation)."""
    outside = [token for token in config.banned_ids if token >= vocab_size]
    if outside:
        raise DecodingError(
            f"decode.banned_ids holds {outside[0]}, outside this model's target vocabulary (ids 0 to {vocab_size - 1})"
        )


class StepConstraints:
    """The restrictions of one decoding call; `apply` is called once per step."""

    def __init__(self, config: DecodeConfig, *, eos_id: int, vocab_size: int, prefix_RP: Tensor | None) -> None:
        check_banned_ids(config, vocab_size)
        self.min_len = config.min_len
        self.banned_ids = list(config.banned_ids)
        self.ngram = config.no_repeat_ngram_size
        self.eos_id = eos_id
        self.prefix_RP = prefix_RP
        self.forced_eos = config.forced_eos

    def apply(self, log_probs_RV: Tensor, step: int, history_RT: Tensor, max_len_R: Tensor) -> Tensor:
        """Restrict the log-probabilities of step `step` (0-based); history_RT is bos + `step` tokens,
        max_len_R each row's maximum length. May modify `log_probs_RV` in place."""
        forced_R = None
        if self.prefix_RP is not None and step < self.prefix_RP.shape[1]:
            forced_R = self.prefix_RP[:, step]  # -1: this row's prefix has ended
            forced_column_R1 = forced_R.clamp(min=0)[:, None]
            forced_log_prob_R1 = log_probs_RV.gather(1, forced_column_R1)  # before any ban
        self._ban_tokens(log_probs_RV)
        if step < self.min_len:
            log_probs_RV[:, self.eos_id] = -float("inf")
        if self.ngram > 0 and history_RT.shape[1] >= self.ngram:
            log_probs_RV = log_probs_RV.masked_fill(
                repeated_ngram_mask(history_RT, self.ngram, log_probs_RV.shape[1]), -float("inf")
            )
        if forced_R is not None:
            forcing_R1 = forced_R[:, None] >= 0
            vocab_V = torch.arange(log_probs_RV.shape[1], device=log_probs_RV.device)
            log_probs_RV = log_probs_RV.masked_fill(forcing_R1 & (vocab_V[None, :] != forced_R[:, None]), -float("inf"))
            kept_R1 = torch.where(forcing_R1, forced_log_prob_R1, log_probs_RV.gather(1, forced_column_R1))
            log_probs_RV = log_probs_RV.scatter(1, forced_column_R1, kept_R1)
        if self.forced_eos:
            self._force_eos(log_probs_RV, max_len_R == step + 1)
        return log_probs_RV

    @property
    def without_history(self) -> bool:
        """Whether `apply_at` can apply them: no n-gram ban and no prefix, so nothing depends on the
        history or on the step as a host number (a search step recorded as a CUDA graph)."""
        return self.ngram == 0 and self.prefix_RP is None

    def apply_at(self, log_probs_RV: Tensor, length_1: Tensor, max_len_R: Tensor) -> Tensor:
        """`apply` for constraints `without_history`, in place, with the number of tokens predicted once
        this step is done (t + 1) held on the device as a (1,) tensor: no host value, no new index tensor."""
        self._ban_tokens(log_probs_RV)
        if self.min_len > 0:
            log_probs_RV[:, self.eos_id].masked_fill_(length_1 <= self.min_len, -float("inf"))
        if self.forced_eos:
            self._force_eos(log_probs_RV, max_len_R == length_1)
        return log_probs_RV

    def _force_eos(self, log_probs_RV: Tensor, last_step_R: Tensor) -> None:
        """In place: the rows at their last step may only end, with eos at log-probability 0."""
        eos_R = torch.where(last_step_R, 0.0, log_probs_RV[:, self.eos_id])
        log_probs_RV.masked_fill_(last_step_R[:, None], -float("inf"))
        log_probs_RV[:, self.eos_id] = eos_R

    def _ban_tokens(self, log_probs_RV: Tensor) -> None:
        """-inf for the banned ids, one column fill each: no index tensor is built and copied to the device
        at every step (and a CUDA graph can record it)."""
        for token in self.banned_ids:
            log_probs_RV[:, token] = -float("inf")

    def select(self, rows: Tensor) -> None:
        """Keep the constraints of these rows only (finished rows left the batch)."""
        if self.prefix_RP is not None:
            self.prefix_RP = self.prefix_RP.index_select(0, rows)


def repeated_ngram_mask(history_RT: Tensor, n: int, vocab_size: int) -> Tensor:
    """(R, V) True for tokens that would repeat an n-gram of the history."""
    windows_RWn = history_RT.unfold(1, n, 1)  # every n-gram so far
    context_R1m = history_RT[:, history_RT.shape[1] - (n - 1) :][:, None, :]  # the last n-1 tokens
    match_RW = (windows_RWn[:, :, : n - 1] == context_R1m).all(dim=-1)
    banned_RW = torch.where(match_RW, windows_RWn[:, :, -1], vocab_size)  # vocab_size: a dummy column
    mask = torch.zeros(history_RT.shape[0], vocab_size + 1, dtype=torch.bool, device=history_RT.device)
    mask.scatter_(1, banned_RW, True)
    return mask[:, :vocab_size]
