"""The chunked cross-entropy equals the plain one: loss, NLL and every gradient, in float64."""

from __future__ import annotations

import copy

import pytest
import torch

from tformer.config import preset
from tformer.model import Transformer
from tformer.training.loss import chunked_label_smoothed_loss, label_smoothed_loss
from tformer.training.step import TrainingObjective


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_loss_and_gradients_equal_the_unchunked_ones(chunk: int) -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, generator=generator, requires_grad=True)
    target = torch.randint(1, 50, (3, 11), generator=generator)
    target[0, 8:] = 0  # padding
    target[2, 5:] = 0

    def project(h: torch.Tensor) -> torch.Tensor:
        return h @ weight.T

    plain = label_smoothed_loss(project(hidden), target, smoothing=0.1, pad_id=0)
    plain_grads = torch.autograd.grad(plain.loss_sum, (hidden, weight))
    chunked = chunked_label_smoothed_loss(hidden, project, target, smoothing=0.1, pad_id=0, chunk=chunk)
    chunked_grads = torch.autograd.grad(chunked.loss_sum, (hidden, weight))
    torch.testing.assert_close(chunked.loss_sum, plain.loss_sum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked.nll_sum, plain.nll_sum, rtol=1e-12, atol=1e-12)
    assert int(chunked.n_tokens) == int(plain.n_tokens) == 33 - 3 - 6
    for a, b in zip(chunked_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_model_objective_with_chunks_equals_the_plain_objective() -> None:
    config = preset("tiny", src_vocab_size=30, tgt_vocab_size=30, final_logits_bias=True)
    model = Transformer(config, seed=2).double()
    with torch.no_grad():  # a non-zero bias, so the projection's every term is exercised
        model.final_logits_bias.uniform_(-1, 1)
    twin = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    src = torch.randint(4, 30, (4, 9), generator=generator)
    tgt = torch.randint(4, 30, (4, 8), generator=generator)
    src[1, 6:], tgt[3, 5:] = 0, 0
    tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]
    plain_loss, plain_nll = TrainingObjective(model)(src, tgt_in, tgt_out, smoothing=0.1, pad_id=0)
    chunk_loss, chunk_nll = TrainingObjective(twin)(src, tgt_in, tgt_out, smoothing=0.1, pad_id=0, loss_chunk=5)
    plain_loss.backward()
    chunk_loss.backward()
    torch.testing.assert_close(chunk_loss, plain_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunk_nll, plain_nll, rtol=1e-12, atol=1e-12)
    for (name, a), b in zip(twin.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_decoder_states_project_to_the_forward_logits(tiny_model: Transformer) -> None:
    src = torch.randint(4, 40, (2, 6))
    tgt = torch.randint(4, 40, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(tiny_model.project_output(tiny_model.decoder_states(src, tgt)), tiny_model(src, tgt))


@pytest.mark.parametrize("clip_norm", [0.0, 0.3])
@pytest.mark.parametrize("chunk", [0, 1, 5])
def test_a_chunked_accumulated_step_equals_torch_cross_entropy_over_one_batch(chunk: int, clip_norm: float) -> None:
    """train_step over micro-batches of 9 and 41 target tokens (with --loss-chunk or without, clipped or
    not) against one batch of all 50 done by hand: torch's cross_entropy mean over its tokens (not the mean
    of the two micro-batches' means, which would weigh a token of the small one 4.6 times as much) and
    clip_grad_norm_ on the whole gradient, in float64."""
    from torch import nn

    from tformer.config import TrainConfig
    from tformer.data.batching import collate
    from tformer.training.optimizer import build_optimizer
    from tformer.training.step import train_step

    generator = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(7):
        s, t = (int(torch.randint(1, n, (1,), generator=generator)) for n in (9, 12))
        pairs.append(tuple(torch.randint(4, 30, (n,), generator=generator).tolist() for n in (s, t)))
    special = dict(pad_id=0, bos_id=1, eos_id=2)
    micro = [collate(pairs, [0], **special), collate(pairs, [1, 2, 3, 4, 5, 6], **special)]
    whole = collate(pairs, list(range(7)), **special)
    assert [batch.n_tgt_tokens for batch in micro] == [9, 41]
    model = Transformer(preset("tiny", src_vocab_size=30, tgt_vocab_size=30, dropout=0.0), seed=3).double()
    reference = copy.deepcopy(model)
    logits = reference(whole.src_ids, whole.tgt_in).flatten(0, 1)
    loss = torch.nn.functional.cross_entropy(logits, whole.tgt_out.flatten(), ignore_index=0, label_smoothing=0.1)
    loss.backward()
    norm = nn.utils.clip_grad_norm_(reference.parameters(), clip_norm if clip_norm else float("inf"))
    assert clip_norm == 0 or norm > clip_norm  # clipping acts
    optimizer = build_optimizer(model, TrainConfig(), device=torch.device("cpu"))
    result = train_step(
        model, optimizer, micro, lr=0.0, smoothing=0.1, pad_id=0, clip_norm=clip_norm, device=torch.device("cpu"),
        loss_chunk=chunk,
    )  # fmt: skip
    assert result.n_tgt_tokens == 50
    torch.testing.assert_close(result.loss_sum / 50, loss.detach(), rtol=1e-14, atol=0)
    if clip_norm:
        torch.testing.assert_close(result.grad_norm, norm, rtol=1e-14, atol=0)
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-12, atol=1e-15, msg=name)


def test_the_chunked_loss_refuses_what_the_plain_one_refuses_naming_it() -> None:
    """It asserted (an AssertionError with a tuple) where label_smoothed_loss raises a ValueError naming the
    argument, and took a smoothing of 1.5."""
    hidden_BTD, project = torch.randn(2, 3, 4), torch.nn.Linear(4, 10)
    targets_BT = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"^target_BT must be \(batch, length\) token ids for hidden_BTD of shape"):
        chunked_label_smoothed_loss(hidden_BTD, project, targets_BT.T, smoothing=0.1, pad_id=0, chunk=2)
    with pytest.raises(ValueError, match=r"^smoothing must be in \[0, 1\), got 1.5$"):
        chunked_label_smoothed_loss(hidden_BTD, project, targets_BT, smoothing=1.5, pad_id=0, chunk=2)
    with pytest.raises(ValueError, match=r"^chunk must be at least 1 target position, got 0$"):
        chunked_label_smoothed_loss(hidden_BTD, project, targets_BT, smoothing=0.1, pad_id=0, chunk=0)
