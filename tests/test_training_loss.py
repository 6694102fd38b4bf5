"""Loss, learning-rate schedules and optimizer settings against their definitions."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import paper_lr

from tformer.config import TrainConfig, preset
from tformer.data.batching import collate
from tformer.model import Transformer
from tformer.training.loss import label_smoothed_loss
from tformer.training.optimizer import build_optimizer
from tformer.training.schedule import inverse_sqrt_lr, learning_rate, peak_lr
from tformer.training.validation import validation_loss


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_loss_matches_torch_cross_entropy_with_ignore_index(smoothing: float) -> None:
    generator = torch.Generator().manual_seed(0)
    logits_BTV = torch.randn(3, 5, 11, generator=generator, dtype=torch.float64) * 3
    target_BT = torch.randint(1, 11, (3, 5), generator=generator)
    target_BT[0, 3:] = 0  # padding
    target_BT[2, 1:] = 0
    sums = label_smoothed_loss(logits_BTV, target_BT, smoothing=smoothing, pad_id=0)
    expected = F.cross_entropy(
        logits_BTV.flatten(0, 1), target_BT.flatten(), ignore_index=0, label_smoothing=smoothing, reduction="sum"
    )
    expected_nll = F.cross_entropy(logits_BTV.flatten(0, 1), target_BT.flatten(), ignore_index=0, reduction="sum")
    assert sums.loss_sum.dtype == torch.float64
    torch.testing.assert_close(sums.loss_sum, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sums.nll_sum, expected_nll, rtol=1e-12, atol=1e-12)
    assert int(sums.n_tokens) == int((target_BT != 0).sum()) == 15 - 2 - 4


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_loss_is_the_cross_entropy_against_the_papers_smoothed_targets(smoothing: float) -> None:
    """Section 5.4 written out: q(v) = (1 - eps) [v == y] + eps / V, loss = -sum_v q(v) log p(v) over
    the positions whose target is not padding, and n_tokens counts exactly those positions."""
    generator = torch.Generator().manual_seed(2)
    V = 7
    logits_BTV = torch.randn(2, 4, V, generator=generator, dtype=torch.float64) * 2
    target_BT = torch.tensor([[5, 3, 6, 0], [4, 0, 0, 0]])  # pad = 0 closes each row
    expected_loss = expected_nll = 0.0
    for b, t in itertools.product(range(2), range(4)):
        y = int(target_BT[b, t])
        if y == 0:
            continue
        p = logits_BTV[b, t].softmax(dim=-1)
        q = [(1 - smoothing) * (v == y) + smoothing / V for v in range(V)]
        expected_loss -= sum(q[v] * math.log(p[v]) for v in range(V))
        expected_nll -= math.log(p[y])
    sums = label_smoothed_loss(logits_BTV, target_BT, smoothing=smoothing, pad_id=0)
    assert float(sums.loss_sum) == pytest.approx(expected_loss, rel=1e-12)
    assert float(sums.nll_sum) == pytest.approx(expected_nll, rel=1e-12)
    assert int(sums.n_tokens) == 4


def test_loss_gradient_matches_torch_and_is_zero_at_padding() -> None:
    generator = torch.Generator().manual_seed(3)
    logits_BTV = torch.randn(3, 5, 11, generator=generator, dtype=torch.float64, requires_grad=True)
    target_BT = torch.randint(1, 11, (3, 5), generator=generator)
    target_BT[1, 2:] = 0
    label_smoothed_loss(logits_BTV, target_BT, smoothing=0.1, pad_id=0).loss_sum.backward()
    ours = logits_BTV.grad.clone()
    logits_BTV.grad = None
    F.cross_entropy(
        logits_BTV.flatten(0, 1), target_BT.flatten(), ignore_index=0, label_smoothing=0.1, reduction="sum"
    ).backward()
    torch.testing.assert_close(ours, logits_BTV.grad, rtol=1e-12, atol=1e-15)
    assert torch.equal(ours[1, 2:], torch.zeros_like(ours[1, 2:]))  # padded positions are not trained


def test_loss_ignores_non_finite_logits_at_padding() -> None:
    logits_BTV = torch.zeros(1, 3, 4)
    logits_BTV[0, 2] = float("nan")
    target_BT = torch.tensor([[1, 2, 0]])
    sums = label_smoothed_loss(logits_BTV, target_BT, smoothing=0.1, pad_id=0)
    assert math.isclose(float(sums.loss_sum), 2 * math.log(4), rel_tol=1e-6)
    assert float(sums.loss_sum.float()) == pytest.approx(float(sums.nll_sum))  # uniform: smoothing changes nothing


def test_validation_loss_is_per_target_token_of_the_whole_set() -> None:
    """Batches with 3 and 13 target tokens: the validation loss is torch's mean over all 16 tokens (not
    the mean of the two batches' means), and perplexity is exp of the mean NLL."""
    model = Transformer(preset("tiny", src_vocab_size=20, tgt_vocab_size=20), seed=0).double().train()
    pairs = [([5, 6], [7, 8]), ([9], [10]), ([11, 12, 13], [14, 15, 16, 17, 18]), ([4, 4], [19, 4, 5, 6])]
    batches = [collate(pairs, rows, pad_id=0, bos_id=1, eos_id=2) for rows in ([0], [1, 2, 3])]
    assert [batch.n_tgt_tokens for batch in batches] == [3, 13]
    measured = validation_loss(model, batches, smoothing=0.1, pad_id=0, device=torch.device("cpu"), autocast_dtype=None)
    assert model.training  # put back as it was
    model.eval()
    with torch.no_grad():
        logits_NV = torch.cat([model(b.src_ids, b.tgt_in).flatten(0, 1) for b in batches])
    target_N = torch.cat([b.tgt_out.flatten() for b in batches])
    smoothed = F.cross_entropy(logits_NV, target_N, ignore_index=0, label_smoothing=0.1)
    nll = F.cross_entropy(logits_NV, target_N, ignore_index=0)
    assert measured["valid_loss"] == pytest.approx(float(smoothed), rel=1e-12)
    assert measured["valid_nll"] == pytest.approx(float(nll), rel=1e-12)
    assert measured["valid_ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-12)


def test_loss_sums_add_up_across_micro_batches() -> None:
    generator = torch.Generator().manual_seed(1)
    logits_BTV = torch.randn(4, 6, 9, generator=generator, dtype=torch.float64)
    target_BT = torch.randint(0, 9, (4, 6), generator=generator)
    whole = label_smoothed_loss(logits_BTV, target_BT, smoothing=0.1, pad_id=0)
    halves = [label_smoothed_loss(logits_BTV[i : i + 2], target_BT[i : i + 2], smoothing=0.1, pad_id=0) for i in (0, 2)]
    torch.testing.assert_close(whole.loss_sum, halves[0].loss_sum + halves[1].loss_sum)
    assert int(whole.n_tokens) == int(halves[0].n_tokens + halves[1].n_tokens)


def test_inverse_sqrt_schedule_is_the_papers_formula() -> None:
    d_model, warmup = 512, 4000
    for step in (1, 10, 3999, 4000, 4001, 100_000):
        expected = d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)
        assert inverse_sqrt_lr(step, d_model=d_model, warmup=warmup) == pytest.approx(expected, rel=1e-15)
    assert inverse_sqrt_lr(4000, d_model=512, warmup=4000, scale=2.0) == pytest.approx(2 * 512**-0.5 * 4000**-0.5)
    # the base model's schedule (d_model 512, 4000 warm-up steps), worked out by hand: it starts near 1.7e-7,
    # peaks near 7.0e-4 at step 4000 and has fallen to 1.4e-4 by step 100,000 (big, d_model 1024: 4.9e-4 peak)
    assert inverse_sqrt_lr(1, d_model=512, warmup=4000) == pytest.approx(1.7469281e-7, rel=1e-7)
    assert inverse_sqrt_lr(4000, d_model=512, warmup=4000) == pytest.approx(6.9877124e-4, rel=1e-7)
    assert inverse_sqrt_lr(100_000, d_model=512, warmup=4000) == pytest.approx(1.3975425e-4, rel=1e-7)
    assert inverse_sqrt_lr(4000, d_model=1024, warmup=4000) == pytest.approx(4.9410588e-4, rel=1e-7)
    # linear warm-up, peak at warmup, then the inverse square root of the step
    assert inverse_sqrt_lr(2000, d_model=512, warmup=4000) == pytest.approx(
        inverse_sqrt_lr(4000, d_model=512, warmup=4000) / 2
    )
    assert inverse_sqrt_lr(16000, d_model=512, warmup=4000) == pytest.approx(
        inverse_sqrt_lr(4000, d_model=512, warmup=4000) / 2
    )


def test_peak_schedule_warms_up_linearly_then_decays() -> None:
    assert peak_lr(1, peak=1e-3, warmup=100) == pytest.approx(1e-5)
    assert peak_lr(50, peak=1e-3, warmup=100) == pytest.approx(5e-4)
    assert peak_lr(100, peak=1e-3, warmup=100) == pytest.approx(1e-3)
    assert peak_lr(400, peak=1e-3, warmup=100) == pytest.approx(5e-4)


@pytest.mark.parametrize("schedule", ["inverse_sqrt", "peak"])
def test_schedules_are_continuous_and_peak_at_warmup(schedule: str) -> None:
    config = TrainConfig(schedule=schedule, warmup_steps=1000, peak_lr=7e-4)
    values = [learning_rate(step, config, d_model=256) for step in range(1, 3000)]
    peak_index = max(range(len(values)), key=values.__getitem__)
    assert peak_index + 1 == 1000
    jumps = [abs(b - a) for a, b in itertools.pairwise(values)]
    assert max(jumps) <= values[peak_index] / 1000 + 1e-12  # no step larger than one warm-up increment


@pytest.mark.parametrize("schedule", ["inverse_sqrt", "peak"])
def test_without_the_ramp_the_peak_holds_from_the_first_step(schedule: str) -> None:
    ramped = TrainConfig(schedule=schedule, warmup_steps=500, peak_lr=1e-3)
    flat = TrainConfig(schedule=schedule, warmup_steps=500, peak_lr=1e-3, warmup_ramp=False)
    peak = learning_rate(500, ramped, d_model=256)
    assert [learning_rate(step, flat, d_model=256) for step in (1, 2, 250, 500)] == [peak] * 4
    assert learning_rate(1, ramped, d_model=256) == pytest.approx(peak / 500)
    for step in (501, 2000, 40_000):  # the same decay once the warm-up would have ended
        assert learning_rate(step, flat, d_model=256) == learning_rate(step, ramped, d_model=256)


@pytest.mark.parametrize("d_model", [32, 512, 1024])
@pytest.mark.parametrize("warmup", [1, 2, 7, 4000])
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_inverse_sqrt_schedule_is_eq_3(d_model: int, warmup: int, scale: float) -> None:
    train = TrainConfig(warmup_steps=warmup, lr_scale=scale)
    steps = sorted({*range(1, 3 * min(warmup, 50) + 2), warmup - 1, warmup, warmup + 1, 2 * warmup, 10**5} - {0})
    for step in steps:
        expected = paper_lr(step, d_model=d_model, warmup=warmup, scale=scale)
        assert learning_rate(step, train, d_model=d_model) == pytest.approx(expected, rel=1e-14, abs=0), step
    # rises to its maximum scale * (d_model * warmup)^-1/2 at step = warmup, falls after
    top = scale / math.sqrt(d_model * warmup)
    assert learning_rate(warmup, train, d_model=d_model) == pytest.approx(top, rel=1e-14)
    assert max(learning_rate(s, train, d_model=d_model) for s in steps) == pytest.approx(top, rel=1e-14)


@pytest.mark.parametrize("warmup", [1, 3, 4000])
def test_peak_schedule_and_no_ramp_match_their_formulas(warmup: int) -> None:
    peak = 7e-4
    steps = sorted({*range(1, 20), warmup - 1, warmup, warmup + 1, 3 * warmup, 10**5} - {0})
    for step in steps:
        expected = peak * step / warmup if step <= warmup else peak / math.sqrt(step / warmup)
        train = TrainConfig(schedule="peak", peak_lr=peak, warmup_steps=warmup)
        assert learning_rate(step, train, d_model=512) == pytest.approx(expected, rel=1e-14, abs=0), step
        # without the ramp the rate holds the maximum until warm-up would have ended
        flat = TrainConfig(schedule="peak", peak_lr=peak, warmup_steps=warmup, warmup_ramp=False)
        expected_flat = peak if step <= warmup else expected
        assert learning_rate(step, flat, d_model=512) == pytest.approx(expected_flat, rel=1e-14, abs=0)
        flat_paper = TrainConfig(warmup_steps=warmup, warmup_ramp=False)
        expected_paper = paper_lr(max(step, warmup), d_model=512, warmup=warmup)
        assert learning_rate(step, flat_paper, d_model=512) == pytest.approx(expected_paper, rel=1e-14, abs=0)


def test_optimizer_is_adam_with_the_papers_settings() -> None:
    model = Transformer(preset("tiny", src_vocab_size=20, tgt_vocab_size=20))
    optimizer = build_optimizer(model, TrainConfig(), device=torch.device("cpu"))
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.98) and group["eps"] == 1e-9 and group["weight_decay"] == 0.0
    counted = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert counted == sum(p.numel() for p in model.parameters())  # the tied embedding once
    decayed = build_optimizer(model, TrainConfig(weight_decay=0.01), device=torch.device("cpu"))
    assert all(p.dim() >= 2 for p in decayed.param_groups[0]["params"])
    assert decayed.param_groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize(
    ("settings", "warned"),
    [
        (dict(), None),
        (dict(schedule="peak", peak_lr=1e-3), None),  # the recipes' schedule
        (dict(lr_scale=2.0), None),
        (dict(peak_lr=1e-3), "train.peak_lr=0.001 plays no part under train.schedule=inverse_sqrt"),
        (dict(schedule="peak", lr_scale=2.0), "train.lr_scale=2 plays no part under train.schedule=peak"),
    ],
)
def test_a_rate_setting_of_the_schedule_not_in_use_is_warned_about(settings: dict, warned: str | None) -> None:
    """`--set train.peak_lr=1e-3` under the default inverse_sqrt schedule, or `--set train.lr_scale=2` under a
    recipe's peak one, changed no learning rate and said nothing: the run trained at the rate it meant to change."""
    from tformer.training.run import warn_about_schedule

    train = TrainConfig(max_steps=10_000, warmup_steps=100, **settings)
    changed = dataclasses.replace(train, peak_lr=2 * train.peak_lr, lr_scale=2 * train.lr_scale)
    unused = "peak_lr" if train.schedule == "inverse_sqrt" else "lr_scale"
    # the setting named plays no part in the rates, which is what the warning says
    unchanged = dataclasses.replace(changed, **{unused: getattr(train, unused)})
    assert [learning_rate(s, changed, d_model=64) for s in (1, 100, 400)] != [
        learning_rate(s, train, d_model=64) for s in (1, 100, 400)
    ]
    assert [learning_rate(s, unchanged, d_model=64) for s in (1, 100, 400)] == [
        learning_rate(s, changed, d_model=64) for s in (1, 100, 400)
    ]
    said: list[str] = []
    warn_about_schedule(train, said.append)
    if warned is None:
        assert said == []
    else:
        assert len(said) == 1 and said[0].startswith(f"warning: {warned}"), said


def test_a_loss_or_schedule_given_what_it_cannot_use_is_a_value_error_naming_it() -> None:
    """Asserts answered a learner's misuse: the targets of another shape (AssertionError), float targets (deep
    in torch's gather), a smoothing of 1.5 (a loss computed anyway), and a plot's range(n) from step 0."""
    logits_BTV = torch.randn(2, 3, 10)
    with pytest.raises(ValueError, match=r"^target_BT must be \(batch, length\) token ids for logits_BTV of shape"):
        label_smoothed_loss(logits_BTV, torch.ones(3, 2, dtype=torch.long), smoothing=0.1, pad_id=0)
    with pytest.raises(ValueError, match=r"got torch.float32 of shape \(2, 3\)$"):
        label_smoothed_loss(logits_BTV, torch.ones(2, 3), smoothing=0.1, pad_id=0)
    with pytest.raises(ValueError, match=r"^smoothing must be in \[0, 1\), got 1.5$"):
        label_smoothed_loss(logits_BTV, torch.ones(2, 3, dtype=torch.long), smoothing=1.5, pad_id=0)
    with pytest.raises(ValueError, match=r"^step and warmup count updates from 1; got step=0, warmup=4000$"):
        inverse_sqrt_lr(0, d_model=512, warmup=4000)
    with pytest.raises(ValueError, match=r"got step=3, warmup=0$"):
        peak_lr(3, peak=1e-3, warmup=0)
