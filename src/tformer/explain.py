"""A walk-through of the Transformer on a tiny example, every number computed by tformer's own modules.

`walkthrough(seed)` builds a one-layer model (d_model 8, 2 heads) over a toy vocabulary, feeds it
"the cat sat </s>" -> "le chat s'assit", and records each step of the computation as tensors:

1. input vectors: token embedding (times sqrt(d_model)) plus the sinusoidal position;
2. q, k, v of every position from the encoder's `SelfAttention.qkv_proj`, split into heads;
3. the scores q·k/sqrt(d_k), one query and one key at a time (all heads together);
4. the softmax of each row of scores;
5. the weighted sum of the values for each query;
6. the same in matrix form (`attention_matrix`, checked equal to the loop form `attention_loop` and to
   the fused kernel), the heads concatenated (`merge_heads`) and projected (`out_proj`), checked equal
   to `SelfAttention.forward`;
7. one encoder block from `EncoderLayer`'s submodules (attention, residual + layer norm, feed-forward),
   checked equal to `EncoderLayer.forward` and to `Transformer.encode`;
8. masked decoder self-attention with `masks.causal_mask`, checked against the fused causal kernel;
9. cross-attention: decoder queries against the keys/values `CrossAttention.project_memory` makes from
   the encoder output, checked equal to `CrossAttention.forward`;
10. the cross-entropy of the teacher-forced prediction, plain and label-smoothed (the paper's eps 0.1),
    checked against `training.loss`; the loss again after one Adam step; the paper's warm-up learning
    rate (`training.schedule.inverse_sqrt_lr`) for the base model;
11. autoregressive decoding: a copy of the model trained on the pair translates the source one token at
    a time, each step a full forward pass over the tokens chosen so far, taking the most probable next
    token until </s>; checked against the same steps with a KV cache (`Transformer.new_cache`: each step
    feeds only the newest token and reads earlier positions' keys and values from the cache) and
    against `tformer.decoding.greedy_search`.

The arithmetic of steps 3-5 (the dot products and softmax a reader follows by hand) is written out in
`tformer.model.attention.attention_loop_steps`, called here; the checks in `Walkthrough.checks` show it
equals the modules' own results. Everything runs in float64, so each check differs only by rounding, of
the order of 1e-16 to 1e-15 (the tests allow 1e-10). The step numbers are those of the headings
`tformer.explain_report.render` prints (and of docs/explain.md); printing and figures live in `tformer.explain_report`.

Shape legend: S source length, T target length, D model dim, H heads, K head dim, F feed-forward dim,
V vocabulary, N decoding steps.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from tformer.config import DecodeConfig, ModelConfig
from tformer.decoding import greedy_search
from tformer.model import Transformer
from tformer.model.attention import (
    attention_fused,
    attention_loop_steps,
    attention_matrix,
    merge_heads,
    split_heads,
)
from tformer.model.masks import causal_mask
from tformer.training.loss import label_smoothed_loss
from tformer.training.schedule import inverse_sqrt_lr

VOCABULARY = ("<pad>", "<s>", "</s>", "<unk>", "the", "cat", "sat", "le", "chat", "s'assit")
SOURCE_WORDS = ("the", "cat", "sat")
TARGET_WORDS = ("le", "chat", "s'assit")
PAD, BOS, EOS = 0, 1, 2
LEARNING_RATE = 0.01
TRAINING_STEPS = 60  # Adam steps on the one pair before it is translated: enough to learn it (step 11)
MAX_NEW_TOKENS = 8
LABEL_SMOOTHING = 0.1  # the paper's eps_ls (section 5.4)
PAPER_D_MODEL, PAPER_WARMUP = 512, 4000  # the base model's schedule (section 5.3), shown in step 10
SCHEDULE_STEPS = (1, 1000, 4000, 16_000, 100_000)  # the steps whose learning rate is printed


def toy_config() -> ModelConfig:
    """d_model 8 and 2 heads: small enough to print every number, large enough to show multi-head."""
    size = len(VOCABULARY)
    return ModelConfig(
        src_vocab_size=size,
        tgt_vocab_size=size,
        d_model=8,
        n_heads=2,
        d_ff=16,
        n_encoder_layers=1,
        n_decoder_layers=1,
        dropout=0.0,
        max_positions=64,
    )


@dataclass
class SelfAttentionSteps:
    """Encoder self-attention of the toy source, one step at a time (head index first)."""

    x_SD: Tensor  # what the sub-layer reads
    q_HSK: Tensor
    k_HSK: Tensor
    v_HSK: Tensor
    scores_HSS: Tensor  # q·k / sqrt(d_k), one query row at a time
    weights_HSS: Tensor  # softmax of each score row
    heads_HSK: Tensor  # weighted sums of the values (attention_loop_steps)
    matrix_HSK: Tensor  # attention_matrix: output ...
    matrix_weights_HSS: Tensor  # ... and weights
    concat_SD: Tensor  # merge_heads
    output_SD: Tensor  # out_proj
    module_output_SD: Tensor  # SelfAttention.forward


@dataclass
class EncoderBlockSteps:
    input_SD: Tensor
    attention_SD: Tensor  # self-attention sub-layer output
    after_attention_SD: Tensor  # residual + layer norm
    hidden_SF: Tensor  # activation(fc1(.))
    feed_forward_SD: Tensor  # fc2(hidden)
    output_SD: Tensor  # residual + layer norm
    module_output_SD: Tensor  # EncoderLayer.forward
    encode_SD: Tensor  # Transformer.encode (one layer, post-norm: the same)


@dataclass
class CausalSteps:
    """Decoder self-attention: position t may read decoder inputs 0..t only."""

    y_TD: Tensor  # target embeddings + positions
    mask_TT: Tensor  # causal_mask, True = may attend
    weights_HTT: Tensor  # attention_matrix with the mask
    output_TD: Tensor  # out_proj(merge_heads(.))
    module_output_TD: Tensor  # SelfAttention.forward(is_causal=True): the fused kernel


@dataclass
class CrossSteps:
    """Cross-attention: queries from the decoder, keys and values from the encoder output."""

    queries_from_TD: Tensor  # decoder state after its self-attention sub-layer
    memory_SD: Tensor  # encoder output
    q_HTK: Tensor
    k_HSK: Tensor
    v_HSK: Tensor
    weights_HTS: Tensor
    output_TD: Tensor
    module_output_TD: Tensor  # CrossAttention.forward


@dataclass
class LossSteps:
    logits_TV: Tensor
    probabilities_TV: Tensor
    target_probability_T: Tensor  # p(correct next token) at each position
    nll_T: Tensor  # -log of it
    loss: float  # mean over positions: the cross-entropy
    module_loss: float  # training.loss.label_smoothed_loss(smoothing=0): nll_sum / n_tokens
    loss_after_step: float  # the same batch after one Adam step
    learning_rate: float
    smoothing: float  # eps
    smoothed_T: Tensor  # (1 - eps) * -log p(correct) + eps * mean over the vocabulary of -log p(v)
    smoothed_loss: float  # mean over positions
    module_smoothed_loss: float  # training.loss.label_smoothed_loss(smoothing=eps): loss_sum / n_tokens
    schedule: dict[int, float]  # step -> the paper's learning rate for the base model (inverse_sqrt_lr)
    schedule_curve: Tensor  # rows of (step, learning rate) for steps 1 .. 4 x warm-up, for the figure


@dataclass
class DecodingSteps:
    """Greedy autoregressive decoding of the source by a copy of the model trained on the pair: one full
    forward pass per new token over <s> and the tokens chosen so far (N steps, the last choosing </s>)."""

    training_steps: int
    loss_after_training: float
    prefixes: list[list[str]]  # the decoder input of each step
    probabilities_NV: Tensor  # the next-token distribution each step
    cached_probabilities_NV: Tensor  # the same from one new token a step with a KV cache
    chosen: list[str]  # the most probable next token each step
    log_prob: float  # sum of log p(chosen) over the steps
    module_tokens: list[str]  # tformer.decoding.greedy_search on the trained copy (eos excluded)
    module_log_prob: float  # its Hypothesis.log_prob (eos included; search keeps log-probabilities in float32)


@dataclass
class Walkthrough:
    seed: int
    config: ModelConfig
    source_tokens: list[str]  # S
    decoder_inputs: list[str]  # T: <s> + target words
    decoder_targets: list[str]  # T: target words + </s>
    embeddings_SD: Tensor  # token embeddings * sqrt(d_model)
    positions_SD: Tensor  # sinusoidal encoding
    attention: SelfAttentionSteps
    encoder_block: EncoderBlockSteps
    causal: CausalSteps
    cross: CrossSteps
    loss: LossSteps
    decoding: DecodingSteps
    checks: dict[str, float] = field(default_factory=dict)  # name -> max |difference|


def ids(words: tuple[str, ...] | list[str]) -> Tensor:
    return torch.tensor([[VOCABULARY.index(word) for word in words]], dtype=torch.long)  # 1 x length


@torch.no_grad()
def encoder_steps(model: Transformer, src_1S: Tensor) -> tuple[Tensor, Tensor, SelfAttentionSteps, EncoderBlockSteps]:
    layer = model.encoder.layers[0]
    attention = layer.self_attention
    embeddings_1SD = model.src_embedding(src_1S)
    positions_SD = model.encoder.positions(src_1S.shape[1])
    x_1SD = embeddings_1SD + positions_SD
    read_1SD = layer.self_attention_residual.before(x_1SD)
    q_1SD, k_1SD, v_1SD = attention.qkv_proj(read_1SD).chunk(3, dim=-1)
    q_1HSK, k_1HSK, v_1HSK = (split_heads(t, attention.n_heads) for t in (q_1SD, k_1SD, v_1SD))
    scores_1HSS, weights_1HSS, sums_1HSK = attention_loop_steps(q_1HSK, k_1HSK, v_1HSK)
    matrix_1HSK, matrix_weights_1HSS = attention_matrix(q_1HSK, k_1HSK, v_1HSK)
    concat_1SD = merge_heads(matrix_1HSK)
    output_1SD = attention.out_proj(concat_1SD)
    steps = SelfAttentionSteps(
        x_SD=read_1SD[0],
        q_HSK=q_1HSK[0],
        k_HSK=k_1HSK[0],
        v_HSK=v_1HSK[0],
        scores_HSS=scores_1HSS[0],
        weights_HSS=weights_1HSS[0],
        heads_HSK=sums_1HSK[0],
        matrix_HSK=matrix_1HSK[0],
        matrix_weights_HSS=matrix_weights_1HSS[0],
        concat_SD=concat_1SD[0],
        output_SD=output_1SD[0],
        module_output_SD=attention(read_1SD, mask=None)[0][0],
    )
    after_1SD = layer.self_attention_residual.after(x_1SD, output_1SD)
    hidden_1SF = layer.feed_forward.activation(layer.feed_forward.fc1(layer.feed_forward_residual.before(after_1SD)))
    feed_forward_1SD = layer.feed_forward.fc2(hidden_1SF)
    block = EncoderBlockSteps(
        input_SD=x_1SD[0],
        attention_SD=output_1SD[0],
        after_attention_SD=after_1SD[0],
        hidden_SF=hidden_1SF[0],
        feed_forward_SD=feed_forward_1SD[0],
        output_SD=layer.feed_forward_residual.after(after_1SD, feed_forward_1SD)[0],
        module_output_SD=layer(x_1SD, mask=None)[0][0],
        encode_SD=model.encode(src_1S)[0],
    )
    return embeddings_1SD[0], positions_SD, steps, block


@torch.no_grad()
def decoder_steps(model: Transformer, tgt_in_1T: Tensor, memory_1SD: Tensor) -> tuple[CausalSteps, CrossSteps]:
    layer = model.decoder.layers[0]
    attention = layer.self_attention
    T = tgt_in_1T.shape[1]
    y_1TD = model.tgt_embedding(tgt_in_1T) + model.decoder.positions(T)
    read_1TD = layer.self_attention_residual.before(y_1TD)
    q_1HTK, k_1HTK, v_1HTK = (split_heads(t, attention.n_heads) for t in attention.qkv_proj(read_1TD).chunk(3, dim=-1))
    mask_11TT = causal_mask(T)
    output_1HTK, weights_1HTT = attention_matrix(q_1HTK, k_1HTK, v_1HTK, mask_11TT)
    self_out_1TD = attention.out_proj(merge_heads(output_1HTK))
    causal = CausalSteps(
        y_TD=y_1TD[0],
        mask_TT=mask_11TT[0, 0],
        weights_HTT=weights_1HTT[0],
        output_TD=self_out_1TD[0],
        module_output_TD=attention(read_1TD, mask=None, is_causal=True)[0][0],
    )
    state_1TD = layer.self_attention_residual.after(y_1TD, self_out_1TD)
    cross_attention = layer.cross_attention
    queries_from_1TD = layer.cross_attention_residual.before(state_1TD)
    q_1HTK = split_heads(cross_attention.q_proj(queries_from_1TD), cross_attention.n_heads)
    k_1HSK, v_1HSK = cross_attention.project_memory(memory_1SD)
    cross_out_1HTK, cross_weights_1HTS = attention_matrix(q_1HTK, k_1HSK, v_1HSK)
    cross = CrossSteps(
        queries_from_TD=queries_from_1TD[0],
        memory_SD=memory_1SD[0],
        q_HTK=q_1HTK[0],
        k_HSK=k_1HSK[0],
        v_HSK=v_1HSK[0],
        weights_HTS=cross_weights_1HTS[0],
        output_TD=cross_attention.out_proj(merge_heads(cross_out_1HTK))[0],
        module_output_TD=cross_attention(queries_from_1TD, memory_kv=(k_1HSK, v_1HSK), mask=None)[0][0],
    )
    return causal, cross


def trained_copy(
    model: Transformer, src_1S: Tensor, tgt_in_1T: Tensor, tgt_out_1T: Tensor, *, steps: int
) -> Transformer:
    """A copy of `model` after `steps` Adam steps on the pair's cross-entropy, in eval mode."""
    trained = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(trained.parameters(), lr=LEARNING_RATE)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(trained(src_1S, tgt_in_1T)[0], tgt_out_1T[0]).backward()
        optimizer.step()
    return trained.eval()


@torch.no_grad()
def pair_loss(model: Transformer, src_1S: Tensor, tgt_in_1T: Tensor, tgt_out_1T: Tensor) -> float:
    """The cross-entropy of the teacher-forced prediction of the pair."""
    return float(F.cross_entropy(model(src_1S, tgt_in_1T)[0], tgt_out_1T[0]))


def loss_steps(model: Transformer, src_1S: Tensor, tgt_in_1T: Tensor, tgt_out_1T: Tensor) -> LossSteps:
    """Cross-entropy of the teacher-forced prediction, and of the same batch after one Adam step."""
    with torch.no_grad():
        logits_1TV = model(src_1S, tgt_in_1T)
    loss = F.cross_entropy(logits_1TV[0], tgt_out_1T[0])
    sums = label_smoothed_loss(logits_1TV, tgt_out_1T, smoothing=0.0, pad_id=PAD)
    smoothed_sums = label_smoothed_loss(logits_1TV, tgt_out_1T, smoothing=LABEL_SMOOTHING, pad_id=PAD)
    trained = trained_copy(model, src_1S, tgt_in_1T, tgt_out_1T, steps=1)
    logits_TV = logits_1TV[0]
    probabilities_TV = torch.softmax(logits_TV, dim=-1)
    target_probability_T = probabilities_TV.gather(1, tgt_out_1T[0][:, None])[:, 0]
    nll_T = -torch.log(target_probability_T)
    # label smoothing: the target puts 1 - eps on the correct token and eps/V on every token
    smoothed_T = (1 - LABEL_SMOOTHING) * nll_T + LABEL_SMOOTHING * -torch.log(probabilities_TV).mean(dim=-1)
    curve_steps = [1, *range(10, 4 * PAPER_WARMUP + 1, 10)]
    return LossSteps(
        logits_TV=logits_TV,
        probabilities_TV=probabilities_TV,
        target_probability_T=target_probability_T,
        nll_T=nll_T,
        loss=float(loss),
        module_loss=float(sums.nll_sum / sums.n_tokens),
        loss_after_step=pair_loss(trained, src_1S, tgt_in_1T, tgt_out_1T),
        learning_rate=LEARNING_RATE,
        smoothing=LABEL_SMOOTHING,
        smoothed_T=smoothed_T,
        smoothed_loss=float(smoothed_T.mean()),
        module_smoothed_loss=float(smoothed_sums.loss_sum / smoothed_sums.n_tokens),
        schedule={step: paper_lr(step) for step in SCHEDULE_STEPS},
        schedule_curve=torch.tensor([(step, paper_lr(step)) for step in curve_steps], dtype=torch.float64),
    )


def paper_lr(step: int) -> float:
    """The learning rate of the paper's base model at `step`: d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)."""
    return inverse_sqrt_lr(step, d_model=PAPER_D_MODEL, warmup=PAPER_WARMUP)


def decoding_steps(model: Transformer, src_1S: Tensor, tgt_in_1T: Tensor, tgt_out_1T: Tensor) -> DecodingSteps:
    """Train a copy of `model` on the pair, then translate the source with it one token at a time."""
    trained = trained_copy(model, src_1S, tgt_in_1T, tgt_out_1T, steps=TRAINING_STEPS)
    decoded = [BOS]
    probabilities = []
    with torch.no_grad():
        prefixes = []
        while decoded[-1] != EOS and len(decoded) <= MAX_NEW_TOKENS:
            prefixes.append([VOCABULARY[i] for i in decoded])
            logits_1TV = trained(src_1S, torch.tensor([decoded]))  # every position again: no cache here
            probabilities_V = torch.softmax(logits_1TV[0, -1], dim=-1)  # the last position predicts the next
            probabilities.append(probabilities_V)
            decoded.append(int(probabilities_V.argmax()))
        # the same steps with a KV cache: each feeds one token; keys and values of earlier positions
        # (and the memory's) are read from the cache instead of being computed again
        cache = trained.new_cache(batch_size=1, capacity=len(decoded), memory=trained.encode(src_1S))
        cached = [
            torch.softmax(
                trained.decode(torch.tensor([[token]]), memory=None, src_pad_mask=None, cache=cache)[0, -1], -1
            )
            for token in decoded[:-1]
        ]
    probabilities_NV = torch.stack(probabilities)
    chosen_N = torch.tensor(decoded[1:])
    config = DecodeConfig(beam_size=1, max_len_a=0.0, max_len_b=MAX_NEW_TOKENS)
    best = greedy_search(trained, src_1S, src_pad_mask=None, bos_id=BOS, eos_id=EOS, config=config)[0][0]
    return DecodingSteps(
        training_steps=TRAINING_STEPS,
        loss_after_training=pair_loss(trained, src_1S, tgt_in_1T, tgt_out_1T),
        prefixes=prefixes,
        probabilities_NV=probabilities_NV,
        cached_probabilities_NV=torch.stack(cached),
        chosen=[VOCABULARY[i] for i in decoded[1:]],
        log_prob=float(probabilities_NV.gather(1, chosen_N[:, None]).log().sum()),
        module_tokens=[VOCABULARY[i] for i in best.tokens],
        module_log_prob=best.log_prob,
    )


def max_difference(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max())


def walkthrough(seed: int = 0) -> Walkthrough:
    """Run the toy example through a freshly initialised model (weights from `seed`)."""
    model = Transformer(toy_config(), seed=seed).double().eval()
    src_1S = ids([*SOURCE_WORDS, "</s>"])
    tgt_in_1T = ids(["<s>", *TARGET_WORDS])
    tgt_out_1T = ids([*TARGET_WORDS, "</s>"])
    embeddings_SD, positions_SD, attention, block = encoder_steps(model, src_1S)
    causal, cross = decoder_steps(model, tgt_in_1T, block.encode_SD[None])
    loss = loss_steps(model, src_1S, tgt_in_1T, tgt_out_1T)
    decoding = decoding_steps(model, src_1S, tgt_in_1T, tgt_out_1T)
    result = Walkthrough(
        seed=seed,
        config=model.config,
        source_tokens=[*SOURCE_WORDS, "</s>"],
        decoder_inputs=["<s>", *TARGET_WORDS],
        decoder_targets=[*TARGET_WORDS, "</s>"],
        embeddings_SD=embeddings_SD,
        positions_SD=positions_SD,
        attention=attention,
        encoder_block=block,
        causal=causal,
        cross=cross,
        loss=loss,
        decoding=decoding,
    )
    fused_HSK = attention_fused(attention.q_HSK[None], attention.k_HSK[None], attention.v_HSK[None])[0]
    result.checks = {
        "softmax(scores) = attention_matrix weights": max_difference(
            attention.weights_HSS, attention.matrix_weights_HSS
        ),
        "attention_loop = attention_matrix": max_difference(attention.heads_HSK, attention.matrix_HSK),
        "attention_matrix = attention_fused": max_difference(attention.matrix_HSK, fused_HSK),
        "out_proj(concat) = SelfAttention.forward": max_difference(attention.output_SD, attention.module_output_SD),
        "block steps = EncoderLayer.forward": max_difference(block.output_SD, block.module_output_SD),
        "EncoderLayer.forward = Transformer.encode": max_difference(block.module_output_SD, block.encode_SD),
        "masked matrix form = fused causal kernel": max_difference(causal.output_TD, causal.module_output_TD),
        "cross steps = CrossAttention.forward": max_difference(cross.output_TD, cross.module_output_TD),
        "cross-entropy = training.loss": abs(loss.loss - loss.module_loss),
        "label-smoothed cross-entropy = training.loss": abs(loss.smoothed_loss - loss.module_smoothed_loss),
        "decoding, full forward each step = KV-cached step": max_difference(
            decoding.probabilities_NV, decoding.cached_probabilities_NV
        ),
    }
    return result
