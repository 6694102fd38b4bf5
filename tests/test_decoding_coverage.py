"""GNMT's coverage penalty (Wu et al. 2016) in beam search, checked against the teacher-forced model.

A finished hypothesis's score is log_prob / lp(n) + beta * sum_j log(min(c_j, 1)), c_j the cross-attention
(last decoder layer, mean over heads) that real source token j received summed over the predicted tokens,
each term floored at log(1e-6) (docs/decoding.md). Here every part is recomputed from one full forward
pass over the hypothesis, in float64, so the search's incremental bookkeeping is checked against the
formula and the model alone."""

from __future__ import annotations

import math

import pytest
import torch

from tformer.config import DecodeConfig, preset
from tformer.decoding import generate
from tformer.decoding.lengths import length_penalty
from tformer.model import Transformer

PAD, BOS, EOS = 0, 1, 2
V = 13


def _teacher_forced(model: Transformer, src_S: torch.Tensor, predicted: list[int]) -> tuple[float, torch.Tensor]:
    """(log-probability of `predicted`, per-source-token coverage) from one forward pass over it."""
    tgt_in = torch.tensor([[BOS, *predicted[:-1]]])
    logits_1TV, maps = model(src_S[None], tgt_in, return_attention=True)
    log_probs_TV = torch.log_softmax(logits_1TV[0], dim=-1)
    log_prob = float(log_probs_TV.gather(1, torch.tensor(predicted)[:, None]).sum())
    cross_TS = maps.cross[-1][0].mean(dim=0)  # last layer, heads averaged
    return log_prob, cross_TS.sum(dim=0)


@pytest.mark.parametrize("beta", [0.2, 2.0])
def test_finished_scores_carry_the_coverage_penalty_of_their_own_attention(beta: float) -> None:
    model = Transformer(preset("tiny", src_vocab_size=V, tgt_vocab_size=V, dropout=0.0), seed=3).double().eval()
    generator = torch.Generator().manual_seed(5)
    src_BS = torch.randint(3, V, (3, 7), generator=generator)
    src_BS[:, -1] = EOS
    src_BS[1, 4:] = PAD  # a shorter source: its padding gets no coverage term
    src_BS[1, 3] = EOS
    config = DecodeConfig(
        beam_size=4, nbest=4, coverage_penalty=beta, max_len_a=0.0, max_len_b=6, length_penalty=0.6,
        length_normalization="gnmt",
    )  # fmt: skip
    with torch.no_grad():
        results = generate(
            model, src_BS, src_pad_mask=src_BS != PAD, bos_id=BOS, eos_id=EOS, config=config, return_attention=True
        )
        penalised = 0
        for b, hypotheses in enumerate(results):
            real_S = src_BS[b][src_BS[b] != PAD]
            for hypothesis in hypotheses:
                ended = hypothesis.attention.shape[0] == len(hypothesis.tokens) + 1  # a row for its eos
                predicted = [*hypothesis.tokens, EOS] if ended else hypothesis.tokens
                log_prob, coverage_S = _teacher_forced(model, real_S, predicted)
                penalty = beta * sum(math.log(min(max(c, 1e-6), 1.0)) for c in coverage_S.tolist())
                expected = log_prob / length_penalty(float(len(predicted)), config) + penalty
                assert hypothesis.log_prob == pytest.approx(log_prob, abs=1e-5)
                assert hypothesis.score == pytest.approx(expected, abs=1e-5), (b, hypothesis.tokens)
                penalised += penalty < -1e-3
                assert torch.allclose(hypothesis.attention.sum(dim=0).double(), coverage_S, atol=1e-5)
            scores = [h.score for h in hypotheses]
            assert scores == sorted(scores, reverse=True)
    assert penalised > 0  # the penalty took part (some source tokens got less than full attention)
