"""tformer's training update equals the same update done by plain PyTorch on Hugging Face's Marian.

The reference shares nothing with tformer's training code: Marian's logits (weights copied by
`to_marian`), `F.cross_entropy(label_smoothing, ignore_index=pad, reduction="sum")` divided by the
target tokens, `clip_grad_norm_`, `torch.optim.Adam` (or `AdamW` with its own decay groups, chosen by
name), and a `LambdaLR` evaluating the paper's eq. 3 written out here. Every step compares the loss,
the learning rate, the total gradient norm, every gradient (a tied matrix's gradient is the sum over
its uses in both models) and every parameter after the update, in float64 without dropout.

Not covered, because Marian cannot express it or cannot be made to draw the same random numbers:
pre-norm (refused by `to_marian`) and dropout (the masks differ). Marian ties no embedding when
`tie_word_embeddings = false` and keeps `final_logits_bias` as a buffer it never trains: the reference
ties the encoder and decoder embeddings itself (one module) and makes the bias a parameter, which is
what tformer's `share_embeddings = true, tie_output = false` and `final_logits_bias = true` train.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import paper_lr, perturbed
from torch import Tensor, nn

from tformer.config import TrainConfig, preset
from tformer.data.batching import Batch, collate
from tformer.interop.marian import SpecialIds, tformer_to_marian_state, to_marian
from tformer.model import Transformer
from tformer.training.optimizer import build_optimizer
from tformer.training.schedule import learning_rate
from tformer.training.step import train_step

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

IDS = SpecialIds(bos_id=1, eos_id=2, pad_id=0)
SPECIAL = dict(pad_id=IDS.pad_id, bos_id=IDS.bos_id, eos_id=IDS.eos_id)
D_MODEL, WARMUP, STEPS = 32, 2, 4  # steps 1-2 warm up, 3-4 decay: both branches of eq. 3
CPU = torch.device("cpu")
RTOL = 1e-12
GRAD_ATOL = 1e-14  # gradient elements reach about 1
# Adam moves each weight by about lr whatever its gradient's size, so a gradient element near zero,
# known to 1e-15 absolute, is known only roughly relative to itself, and so is its step. Parameters
# (of order 1; lr up to 0.125) therefore agree to 1e-11 absolute, not 1e-12 relative.
PARAM_ATOL = 1e-11
# A key projection's bias has an exactly zero gradient (softmax ignores a shift shared by all keys), so
# both models hold rounding noise of about 3e-17 there, which Adam divides by eps = 1e-9: such a
# parameter drifts by up to lr * 3e-8 a step in either model (the 4 steps' lrs sum to 0.38).
KEY_BIAS_ATOL = 3e-8


def random_pairs(n: int, *, src_vocab: int, tgt_vocab: int, seed: int) -> list[tuple[list[int], list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (n, 2), generator=generator).tolist()
    return [
        (
            torch.randint(3, src_vocab, (s,), generator=generator).tolist(),
            torch.randint(3, tgt_vocab, (t,), generator=generator).tolist(),
        )
        for s, t in lengths
    ]


def reference_model(ours: Transformer) -> tuple[nn.Module, dict[str, Tensor]]:
    """Marian with `ours`'s weights, in training mode, and the parameters its optimizer updates."""
    config = ours.config
    theirs = to_marian(ours, IDS).train()
    for positions in (theirs.model.encoder.embed_positions, theirs.model.decoder.embed_positions):
        # Marian's create_weight rounds its sinusoids to float32 (torch.FloatTensor) whatever the model's
        # dtype, 3e-8 off in float64; tformer's float64 table is exact. Use the exact values of its formula.
        n_positions, dim = positions.weight.shape
        angle = torch.arange(n_positions, dtype=torch.float64)[:, None] / 10000 ** (
            2 * (torch.arange(dim, dtype=torch.float64) // 2) / dim
        )
        positions.weight.data.copy_(torch.cat([angle[:, 0::2].sin(), angle[:, 1::2].cos()], dim=1))
    if config.share_embeddings and not config.tie_output:
        # Marian unties everything without tie_word_embeddings; tie the two embeddings by hand
        theirs.model.decoder.embed_tokens = theirs.model.encoder.embed_tokens
    if config.final_logits_bias:
        # Marian keeps the bias as a buffer, never trained; train it as tformer does
        bias = theirs._buffers.pop("final_logits_bias")
        theirs.final_logits_bias = nn.Parameter(bias.clone())
    used = {id(theirs.model.encoder.embed_tokens.weight), id(theirs.model.decoder.embed_tokens.weight)}
    params = {
        name: p
        for name, p in theirs.named_parameters()  # each shared tensor once
        if p.requires_grad and not (name == "model.shared.weight" and id(p) not in used)
    }
    return theirs, params


def reference_optimizer(params: dict[str, Tensor], weight_decay: float) -> torch.optim.Optimizer:
    options = dict(lr=1.0, betas=(0.9, 0.98), eps=1e-9)  # lr: LambdaLR's factor multiplies it
    if weight_decay == 0:
        return torch.optim.Adam(list(params.values()), **options)
    # decay every matrix: projections and embeddings, not biases, layer norms or the logits bias
    no_decay = [p for name, p in params.items() if name.endswith("bias") or "layer_norm" in name]
    decay = [p for name, p in params.items() if not (name.endswith("bias") or "layer_norm" in name)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, **options)


def reference_step(
    theirs: nn.Module, params: dict[str, Tensor], optimizer: torch.optim.Optimizer, batch: Batch, *, smoothing: float,
    clip_norm: float,
) -> tuple[float, float, float | None]:  # fmt: skip
    """(per-token smoothed loss, per-token NLL, gradient norm before clipping) of one plain PyTorch update."""
    optimizer.zero_grad(set_to_none=True)
    src_keep, tgt_keep = batch.src_ids != IDS.pad_id, batch.tgt_in != IDS.pad_id
    logits = theirs(
        input_ids=batch.src_ids, attention_mask=src_keep.long(),
        decoder_input_ids=batch.tgt_in, decoder_attention_mask=tgt_keep.long(),
    ).logits  # fmt: skip
    labels = batch.tgt_out.flatten()
    tokens = int((labels != IDS.pad_id).sum())
    flat = logits.flatten(0, 1)
    loss = F.cross_entropy(flat, labels, ignore_index=IDS.pad_id, label_smoothing=smoothing, reduction="sum") / tokens
    nll = F.cross_entropy(flat, labels, ignore_index=IDS.pad_id, reduction="sum") / tokens
    loss.backward()
    norm = None
    if clip_norm > 0:
        norm = float(nn.utils.clip_grad_norm_(list(params.values()), clip_norm))
    optimizer.step()
    return loss.item(), nll.item(), norm


def as_marian(ours: Transformer, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """tformer-named tensors (parameters or their gradients) under Marian's names, (1, V) logits bias."""
    return tformer_to_marian_state(tensors, ours.config)


def assert_matches(name: str, actual: Tensor, expected: Tensor, what: str, step: int) -> None:
    atol = GRAD_ATOL if what == "gradient" else KEY_BIAS_ATOL if "k_proj.bias" in name else PARAM_ATOL
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol, msg=lambda m: f"step {step}, {what} {name}: {m}")


CASES = {
    "shared_tied": dict(),
    "shared_untied": dict(tie_output=False),
    "separate_tied": dict(share_embeddings=False, tgt_vocab_size=37),
    "separate_untied_logits_bias": dict(share_embeddings=False, tgt_vocab_size=37, tie_output=False,
                                        final_logits_bias=True),
}  # fmt: skip


@pytest.mark.parametrize(
    ("case", "smoothing", "clip_norm", "accumulate", "weight_decay"),
    [
        ("shared_tied", 0.1, 0.0, 1, 0.0),
        ("shared_tied", 0.0, 0.5, 2, 0.0),
        ("shared_untied", 0.1, 0.5, 1, 0.0),
        ("shared_untied", 0.0, 0.0, 2, 0.01),
        ("separate_tied", 0.0, 0.0, 1, 0.01),
        ("separate_tied", 0.1, 0.5, 2, 0.0),
        ("separate_untied_logits_bias", 0.1, 0.5, 1, 0.01),
        ("separate_untied_logits_bias", 0.0, 0.0, 2, 0.0),
    ],
)
def test_updates_match_plain_pytorch_on_marian(
    case: str, smoothing: float, clip_norm: float, accumulate: int, weight_decay: float
) -> None:
    overrides = dict(src_vocab_size=41, tgt_vocab_size=41, sinusoidal_layout="concatenated", dropout=0.0)
    ours = perturbed(Transformer(preset("tiny", **overrides | CASES[case]), seed=3), seed=4).double().train()
    theirs, params = reference_model(ours)
    train = TrainConfig(warmup_steps=WARMUP, clip_norm=clip_norm, label_smoothing=smoothing, weight_decay=weight_decay,
                        accumulate=accumulate)  # fmt: skip
    optimizer = build_optimizer(ours, train, device=CPU)
    their_optimizer = reference_optimizer(params, weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        their_optimizer, lambda epoch: paper_lr(epoch + 1, d_model=D_MODEL, warmup=WARMUP)
    )
    config = ours.config
    pairs = random_pairs(6 * STEPS, src_vocab=config.src_vocab_size, tgt_vocab=config.tgt_vocab_size, seed=5)
    for step in range(1, STEPS + 1):
        rows = list(range(6 * (step - 1), 6 * step))
        micro = [collate(pairs, part, **SPECIAL) for part in (rows[:3], rows[3:])] if accumulate == 2 else None
        whole = collate(pairs, rows, **SPECIAL)  # accumulation must equal one batch twice as large
        lr = learning_rate(step, train, d_model=D_MODEL)
        their_lr = their_optimizer.param_groups[0]["lr"]
        assert lr == pytest.approx(their_lr, rel=1e-15, abs=0)
        result = train_step(
            ours, optimizer, micro or [whole], lr=lr, smoothing=smoothing, pad_id=IDS.pad_id, clip_norm=clip_norm,
            device=CPU,
        )  # fmt: skip
        assert all(group["lr"] == lr for group in optimizer.param_groups)
        loss, nll, norm = reference_step(
            theirs, params, their_optimizer, whole, smoothing=smoothing, clip_norm=clip_norm
        )
        schedule.step()

        assert result.n_tgt_tokens == whole.n_tgt_tokens
        assert result.loss_sum.dtype == torch.float64
        torch.testing.assert_close(float(result.loss_sum) / result.n_tgt_tokens, loss, rtol=RTOL, atol=0)
        torch.testing.assert_close(float(result.nll_sum) / result.n_tgt_tokens, nll, rtol=RTOL, atol=0)
        if clip_norm > 0:
            assert result.grad_norm is not None and norm is not None
            assert step > 1 or norm > clip_norm  # clipping really acts, at least on the first step
            torch.testing.assert_close(float(result.grad_norm), norm, rtol=RTOL, atol=0)
        else:
            assert result.grad_norm is None
        our_grads = as_marian(ours, {n: p.grad for n, p in ours.named_parameters()})
        our_params = as_marian(ours, dict(ours.named_parameters()))
        for name, p in params.items():
            assert_matches(name, our_grads[name], p.grad, "gradient", step)
            assert_matches(name, our_params[name], p.detach(), "parameter", step)
        # every trained tensor of each model is one of the other's: Marian splits each fused Q|K|V weight and
        # bias in three (2 more tensors per attention), each cross-attention K|V in two (1 more)
        split = 4 * config.n_encoder_layers + 6 * config.n_decoder_layers
        assert len(params) == sum(p.requires_grad for p in ours.parameters()) + split
