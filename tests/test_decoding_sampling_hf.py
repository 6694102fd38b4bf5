"""Sampling against Hugging Face's logits warpers: the distribution a token is drawn from, and the draws.

The reference is what `generate(do_sample=True, num_beams=1)` applies to the next-token scores: a
`TemperatureLogitsWarper` (when temperature != 1), then a `TopKLogitsWarper` (when top_k != 0), then a
`TopPLogitsWarper` (when top_p < 1), each with `min_tokens_to_keep=1`, then a softmax
(`GenerationMixin._get_logits_processor` in transformers 4.45 to 5.x). tformer's seam is
`Sampler.shaped_log_probs`, what `Sampler.__call__` draws from.

Shape legend: R rows, V vocabulary.
"""

from __future__ import annotations

import math

import pytest
import torch

from tformer.config import DecodeConfig
from tformer.decoding.sampling import Sampler

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

V = 40


def hf_probs(logits_RV: torch.Tensor, *, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The probabilities HF's sampling draws from, the warpers in generate()'s order and conditions."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    input_ids = torch.zeros(logits_RV.shape[0], 1, dtype=torch.long)  # unused by these warpers
    return warpers(input_ids, logits_RV.clone()).softmax(dim=-1)


def sampler(rows: int, *, seed: int = 0, **settings) -> Sampler:
    return Sampler(DecodeConfig(sampling=True, seed=seed, **settings), torch.arange(rows))


def tformer_probs(logits_RV: torch.Tensor, **settings) -> torch.Tensor:
    return sampler(logits_RV.shape[0], **settings).shaped_log_probs(logits_RV).exp()


def random_logits(dtype: torch.dtype, *, seed: int = 0) -> torch.Tensor:
    """8 rows of V logits with a few banned (-inf) tokens, as `banned_ids` and `min_len` leave them; the
    last row has only 3 tokens left, fewer than most top-k values below."""
    generator = torch.Generator().manual_seed(seed)
    logits_RV = (torch.randn(8, V, generator=generator, dtype=torch.float64) * 2.5).to(dtype)
    banned_RV = torch.rand(8, V, generator=generator) < 0.1
    banned_RV[-1] = True
    banned_RV[-1, torch.randperm(V, generator=generator)[:3]] = False
    return logits_RV.masked_fill(banned_RV, -float("inf"))


def top_p_margin(logits_RV: torch.Tensor, *, temperature: float, top_k: int, top_p: float) -> float:
    """How far top_p is from every row's cumulative sums after temperature and top-k (exact arithmetic
    would keep the same tokens in both implementations only if it is not zero, and rounding the same
    only if it is well above the dtype's resolution)."""
    probs_RV = hf_probs(logits_RV.double(), temperature=temperature, top_k=top_k, top_p=1.0)
    cumulative_RV = probs_RV.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    return (cumulative_RV - top_p).abs().min().item()


GRID = [
    (temperature, top_k, top_p)
    for temperature in (0.5, 1.0, 1.7)
    for top_k in (0, 1, 2, 7, V - 1, V, V + 10)
    for top_p in (1e-9, 0.3, 0.9, 1.0)
]


@pytest.mark.parametrize(
    "dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["float64", "float32"]
)
def test_shaped_distribution_equals_hf_warpers(dtype: torch.dtype, tolerance: float) -> None:
    """Over the grid (top_k 1 and >= V, top_p so small only the argmax stays, banned tokens, a row with
    fewer tokens left than top_k) the same tokens keep a probability, and the same one."""
    logits_RV = random_logits(dtype)
    for temperature, top_k, top_p in GRID:
        settings = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        if top_p < 1.0:
            assert top_p_margin(logits_RV, **settings) > 1e-5, settings  # no rounding could move the boundary
        ours_RV = tformer_probs(logits_RV, **settings)
        theirs_RV = hf_probs(logits_RV, **settings)
        assert torch.equal(ours_RV > 0, theirs_RV > 0), settings
        torch.testing.assert_close(ours_RV, theirs_RV, rtol=tolerance, atol=tolerance, msg=str(settings))
        if top_k == 1 or top_p == 1e-9:  # only the most probable token stays
            assert torch.equal(ours_RV.argmax(dim=-1), logits_RV.argmax(dim=-1))
            assert torch.equal(ours_RV.max(dim=-1).values, torch.ones(8, dtype=dtype))


def test_ties_at_the_top_k_boundary_are_all_kept_as_hf_keeps_them() -> None:
    logits_RV = torch.tensor([[3.0, 1.0, 2.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    for top_k in (3, 4, 5):  # the k-th largest is a 1.0 shared by three tokens: all three stay
        ours_RV = tformer_probs(logits_RV, top_k=top_k)
        assert torch.equal(ours_RV > 0, torch.tensor([[True, True, True, True, True, False]]))
        torch.testing.assert_close(ours_RV, hf_probs(logits_RV, temperature=1.0, top_k=top_k, top_p=1.0))


@pytest.mark.parametrize(
    "probs, top_p, ours",
    [
        ([0.3, 0.4, 0.3], 0.5, [0, 1]),  # 0.4 is not enough; with either 0.3 it is 0.7
        ([0.1, 0.3, 0.3, 0.3], 0.5, [1, 2]),
        ([0.45, 0.1, 0.45], 1e-9, [0]),  # a tied argmax: top_p tiny keeps one of the two
    ],
)
def test_ties_at_the_top_p_boundary(probs: list[float], top_p: float, ours: list[int]) -> None:
    """Of tokens tied at the boundary, both keep as many, with the same probabilities; tformer keeps the
    lowest ids (on the CPU, whose sort is stable), HF may keep others (on the CPU the highest): the
    smallest set that reaches top_p is not unique, and docs/decoding.md says which tformer keeps."""
    logits_RV = torch.tensor([probs], dtype=torch.float64).log()
    ours_V = tformer_probs(logits_RV, top_p=top_p)[0]
    theirs_V = hf_probs(logits_RV, temperature=1.0, top_k=0, top_p=top_p)[0]
    assert (ours_V > 0).nonzero()[:, 0].tolist() == ours
    assert int((theirs_V > 0).sum()) == len(ours)
    torch.testing.assert_close(ours_V.sort().values, theirs_V.sort().values, rtol=1e-12, atol=1e-15)


def chi_square_bound(degrees: int, *, z: float = 4.753) -> float:
    """The chi-square quantile that a correct sampler exceeds with probability 1e-6 (z is the normal's
    1 - 1e-6 quantile), by the Wilson-Hilferty approximation: a little above the exact quantile (30.3
    against 27.6 at 2 degrees, 84.2 against 83.6 at 31), so a correct sampler fails even less often."""
    h = 2 / (9 * degrees)
    return degrees * (1 - h + z * math.sqrt(h)) ** 3


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 1.0, "top_k": 0, "top_p": 1.0},
        {"temperature": 0.7, "top_k": 7, "top_p": 1.0},
        {"temperature": 1.7, "top_k": 0, "top_p": 0.9},
        {"temperature": 1.3, "top_k": 12, "top_p": 0.8},
        {"temperature": 1.0, "top_k": V + 10, "top_p": 0.5},
    ],
    ids=lambda settings: "-".join(f"{key}={value:g}" for key, value in settings.items()),
)
def test_draws_follow_hf_distribution(settings: dict) -> None:
    """20,000 seeded draws (4,000 rows, 5 steps) of a row of logits with banned tokens: no draw outside
    HF's support, and a chi-square statistic over its tokens (the rarest pooled until each cell expects
    5 draws) below the 1e-6 quantile. The seed is fixed, so the test is deterministic; the bound says that
    a correct sampler would fail with that seed only once in a million seeds."""
    rows, steps = 4000, 5
    logits_1V = random_logits(torch.float32, seed=3)[2:3]
    expected_V = hf_probs(logits_1V.double(), **settings)[0]
    draw = sampler(rows, seed=11, **settings)
    counts_V = torch.zeros(V, dtype=torch.float64)
    for _ in range(steps):
        tokens_R = draw(logits_1V.expand(rows, -1).contiguous(), torch.arange(rows))
        counts_V += torch.bincount(tokens_R, minlength=V).double()
    n = rows * steps
    assert counts_V[expected_V == 0].sum() == 0
    order = expected_V.argsort(descending=True)
    order = order[expected_V[order] > 0]
    cells, pooled_expected, pooled_count = [], 0.0, 0.0
    for token in reversed(order.tolist()):  # rarest first: pool until a cell expects 5 draws
        pooled_expected += n * expected_V[token].item()
        pooled_count += counts_V[token].item()
        if pooled_expected >= 5:
            cells.append((pooled_count, pooled_expected))
            pooled_expected = pooled_count = 0.0
    if pooled_expected:  # a remainder joins the last cell
        count, expectation = cells.pop() if cells else (0.0, 0.0)
        cells.append((count + pooled_count, expectation + pooled_expected))
    statistic = sum((count - expectation) ** 2 / expectation for count, expectation in cells)
    if len(cells) == 1:  # a single token: every draw is it
        assert counts_V.max() == n
    else:
        assert statistic < chi_square_bound(len(cells) - 1), (statistic, len(cells))
