"""Showing a `tformer.explain.Walkthrough`: small plain-text tables for the terminal, and PNG figures.

Nothing here computes the model: every number comes from the Walkthrough's tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from tformer.atomic_file import directories_made
from tformer.explain import VOCABULARY, Walkthrough
from tformer.viz.png_file import save_png
from tformer.viz.positional import save_positional_png


# ---------------------------------------------------------------------------------------------- text
def table(values: Tensor, row_labels: Sequence[str], col_labels: Sequence[str], *, decimals: int = 3) -> str:
    """A right-aligned text table of a 2-D tensor."""
    cells = [[f"{float(v):.{decimals}f}" for v in row] for row in values.tolist()]
    width = max(len(c) for c in [*col_labels, *(c for row in cells for c in row)])
    label_width = max(len(label) for label in row_labels)
    lines = [" " * label_width + "  " + " ".join(c.rjust(width) for c in col_labels)]
    for label, row in zip(row_labels, cells, strict=True):
        lines.append(label.ljust(label_width) + "  " + " ".join(c.rjust(width) for c in row))
    return "\n".join(lines)


def dims(n: int, prefix: str = "d") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def heading(number: int | str, title: str) -> str:
    return f"\n== {number}. {title} " + "=" * max(3, 72 - len(title))


def worked_score(w: Walkthrough, head: int = 0, query: int = 1, key: int = 0) -> str:
    """One score written out term by term, so a reader can redo it by hand."""
    a = w.attention
    q, k = a.q_HSK[head, query], a.k_HSK[head, key]
    terms = " + ".join(f"({float(x):.3f})({float(y):.3f})" for x, y in zip(q, k, strict=True))
    head_dim = q.shape[0]
    return (
        f"worked example, head {head}, query {w.source_tokens[query]!r}, key {w.source_tokens[key]!r}:\n"
        f"  q·k / sqrt({head_dim}) = [{terms}] / {head_dim**0.5:g} = {float(a.scores_HSS[head, query, key]):.3f}"
    )


def worked_softmax(w: Walkthrough, head: int = 0, query: int = 1) -> str:
    """One row of weights written out: each exponentiated score over the sum of them all."""
    scores = [float(s) for s in w.attention.scores_HSS[head, query]]
    key = int(w.attention.weights_HSS[head, query].argmax())
    denominator = " + ".join(f"e^({s:.3f})" for s in scores)
    return (
        f"worked example, head {head}, query {w.source_tokens[query]!r}, key {w.source_tokens[key]!r}:\n"
        f"  e^({scores[key]:.3f}) / [{denominator}] = {float(w.attention.weights_HSS[head, query, key]):.3f}"
    )


def worked_sum(w: Walkthrough, head: int = 0, query: int = 1, dimension: int = 0) -> str:
    """One number of a query's output written out: the weights times that dimension of each value."""
    a = w.attention
    terms = " + ".join(
        f"({float(weight):.3f})({float(value):.3f})"
        for weight, value in zip(a.weights_HSS[head, query], a.v_HSK[head, :, dimension], strict=True)
    )
    return (
        f"worked example, head {head}, query {w.source_tokens[query]!r}, dimension o{dimension}: "
        "sum over the keys of weight x value:\n"
        f"  {terms} = {float(a.heads_HSK[head, query, dimension]):.3f}"
    )


def render(w: Walkthrough) -> str:
    """The whole walk-through as text: steps 1 to 11, then the checks against tformer's modules."""
    out = [
        *input_lines(w),
        *self_attention_lines(w),
        *encoder_block_lines(w),
        *decoder_attention_lines(w),
        *training_lines(w),
        *decoding_lines(w),
        heading("checks", "each step equals what tformer's modules compute (max |difference|)"),
    ]
    out += [f"  {value:.1e}  {name}" for name, value in w.checks.items()]
    return "\n".join(out) + "\n"


def input_lines(w: Walkthrough) -> list[str]:
    """The model and the pair, then step 1: the vectors the encoder starts from."""
    c, src = w.config, w.source_tokens
    return [
        f"A Transformer with d_model={c.d_model}, {c.n_heads} heads of {c.head_dim} dimensions, d_ff={c.d_ff}, "
        f"one encoder and one decoder layer, weights from seed {w.seed}.",
        f"Source: {' '.join(src)}    target: {' '.join(w.decoder_targets)}",
        heading(1, f"input vectors: token embedding x sqrt({c.d_model}) + sinusoidal position"),
        f"token embedding x sqrt({c.d_model}): each token's row of the embedding matrix times {c.d_model**0.5:.3f}:",
        table(w.embeddings_SD, src, dims(c.d_model)),
        f"position (sinusoidal_table): PE(pos, 2i) = sin(pos / 10000^(2i/{c.d_model})), "
        f"PE(pos, 2i+1) = cos(pos / 10000^(2i/{c.d_model})):",
        table(w.positions_SD, src, dims(c.d_model)),
        "x = embedding + position:",
        table(w.encoder_block.input_SD, src, dims(c.d_model)),
    ]


def self_attention_lines(w: Walkthrough) -> list[str]:
    """Steps 2 to 6: the encoder's self-attention, head by head, then in matrix form."""
    c, a, src = w.config, w.attention, w.source_tokens
    H, K = c.n_heads, c.head_dim
    out = [
        heading(2, f"queries, keys, values: SelfAttention.qkv_proj, split into {H} heads of {K}"),
        f"q = x W^Q + b^Q, and k and v likewise (one {c.d_model} x {3 * c.d_model} projection, qkv_proj); head h takes",
        f"dimensions {K}h .. {K}h+{K - 1} of each (split_heads) and attends on its own in steps 3 to 5:",
    ]
    for h in range(H):
        for name, values in (("q", a.q_HSK), ("k", a.k_HSK), ("v", a.v_HSK)):
            out += [f"head {h} {name}:", table(values[h], src, dims(K, name))]
    out.append(heading(3, f"scores q·k / sqrt({K}): one row per query, one column per key"))
    out.append(worked_score(w))
    for h in range(H):
        out += [f"head {h} scores:", table(a.scores_HSS[h], src, src)]
    out.append(heading(4, "softmax of each row: how much each query takes from each key"))
    out.append(worked_softmax(w))
    for h in range(H):
        out += [f"head {h} weights (rows sum to 1):", table(a.weights_HSS[h], src, src)]
    out.append(heading(5, "weighted sum of the value vectors: each query's output"))
    out.append(worked_sum(w))
    for h in range(H):
        out += [f"head {h} output:", table(a.heads_HSK[h], src, dims(K, "o"))]
    out += [
        heading(6, "matrix form softmax(Q K^T / sqrt(d_k)) V, heads concatenated and projected"),
        "concat of the heads (merge_heads):",
        table(a.concat_SD, src, dims(c.d_model)),
        "out_proj(concat) = the self-attention output:",
        table(a.output_SD, src, dims(c.d_model)),
    ]
    return out


def encoder_block_lines(w: Walkthrough) -> list[str]:
    """Step 7: the residual connections, layer norms and feed-forward around the self-attention."""
    b, src, labels = w.encoder_block, w.source_tokens, dims(w.config.d_model)
    return [
        heading(7, "one encoder block: h = layer norm(x + attention(x)), then layer norm(h + feed-forward(h))"),
        "after the attention residual and layer norm:",
        table(b.after_attention_SD, src, labels),
        "feed-forward output fc2(relu(fc1(.))):",
        table(b.feed_forward_SD, src, labels),
        "block output (the encoder's memory):",
        table(b.output_SD, src, labels),
    ]


def decoder_attention_lines(w: Walkthrough) -> list[str]:
    """Steps 8 and 9: the decoder's masked self-attention and its cross-attention to the source."""
    tin, src = w.decoder_inputs, w.source_tokens
    out = [
        heading(8, "masked decoder self-attention: position t reads decoder inputs 0..t"),
        "causal mask (1 = may attend):",
        table(w.causal.mask_TT.double(), tin, tin, decimals=0),
        "where the mask is 0, the most negative float is added to the score before the softmax",
        "(masks.additive_mask), so e^score, and with it the weight, is 0:",
    ]
    for h in range(w.config.n_heads):
        out += [f"head {h} weights (zero above the diagonal):", table(w.causal.weights_HTT[h], tin, tin)]
    out.append(heading(9, "cross-attention: decoder queries, keys and values from the encoder output"))
    out.append("queries: the decoder's state after step 8 (with its residual and layer norm);")
    out.append("keys and values: the encoder's output of step 7, so every target position reads the whole source:")
    for h in range(w.config.n_heads):
        out += [f"head {h} weights (rows: decoder inputs, columns: source):", table(w.cross.weights_HTS[h], tin, src)]
    return out


def training_lines(w: Walkthrough) -> list[str]:
    """Step 10: the loss of the pair, label smoothing, one Adam step, the paper's learning rate."""
    tin, tout = w.decoder_inputs, w.decoder_targets
    loss, eps, V = w.loss, w.loss.smoothing, w.config.tgt_vocab_size
    rows = np.stack([loss.target_probability_T.numpy(), loss.nll_T.numpy(), loss.smoothed_T.numpy()], axis=1)
    return [
        heading(10, "cross-entropy training: teacher forcing, label smoothing, the learning-rate schedule"),
        f"teacher forcing: the decoder reads the reference shifted right ({' '.join(tin)}), and every",
        f"position predicts the next reference token ({' '.join(tout)}) in one pass. After the",
        "decoder block's feed-forward sub-layer, residual and layer norm (as in step 7), the output",
        "projection (the target embedding, transposed: Transformer.project_output) turns each position's",
        f"vector into {V} logits, one per token, and a softmax turns those into the next token's probabilities.",
        "at each position: the probability of the correct next token, -log of it, and the smoothed loss:",
        table(Tensor(rows), [f"{i} -> {t}" for i, t in zip(tin, tout, strict=True)], ["p(next)", "-log p", "smoothed"]),
        f"loss = mean(-log p) = {loss.loss:.4f}   (a uniform guess over {V} tokens: {np.log(V):.4f})",
        f"label smoothing, eps = {eps} (the paper's): the target puts 1 - eps + eps/V = {1 - eps + eps / V:.2f} "
        "on the correct",
        f"token and eps/V = {eps / V:.2f} on each other one, so a position's loss is {1 - eps:g} x (-log p) + "
        f"{eps:g} x the mean",
        f"over the vocabulary of -log p(v); their mean is {loss.smoothed_loss:.4f}, what training minimises",
        f"after one Adam step (lr {loss.learning_rate}) on this pair the loss is {loss.loss_after_step:.4f}",
        "the paper's learning rate, lrate = d_model^-0.5 x min(step^-0.5, step x warmup^-1.5), rises linearly for",
        "the warm-up steps, then decays as 1/sqrt(step); for the base model (d_model 512, warmup 4000):",
        "  " + "   ".join(f"step {step}: {rate:.1e}" for step, rate in loss.schedule.items()),
        "(to keep the toy short, its Adam steps here and in step 11 take plain cross-entropy at a constant lr)",
    ]


def decoding_lines(w: Walkthrough) -> list[str]:
    """Step 11: the trained copy translating the source, one token at a time."""
    d, source = w.decoding, " ".join(w.source_tokens[:-1])
    lines = [
        heading(11, "autoregressive decoding: one token at a time, each step reads the tokens chosen so far"),
        f"a copy of the model after {d.training_steps} Adam steps on this pair (loss {w.loss.loss:.4f} -> "
        f"{d.loss_after_training:.4f}) translates {source!r}.",
        "Each step runs the decoder on <s> and the tokens chosen so far; the last position's softmax is the",
        "next token's distribution; greedy search takes the most probable token, until </s>:",
    ]
    width = max(len(" ".join(prefix)) for prefix in d.prefixes)
    for step, (prefix, probabilities_V) in enumerate(zip(d.prefixes, d.probabilities_NV, strict=True), start=1):
        top = probabilities_V.topk(3)
        candidates = "  ".join(f"{VOCABULARY[i]} {float(p):.3f}" for p, i in zip(top.values, top.indices, strict=True))
        lines.append(
            f"  step {step}  input: {' '.join(prefix).ljust(width)}  next: {candidates}  -> {d.chosen[step - 1]}"
        )
    lines += [
        f"translation: {' '.join(token for token in d.chosen if token != '</s>')}   "
        f"(log-probability {d.log_prob:.4f}, the sum of log p(chosen))",
        "with a KV cache each step feeds only its newest token: the keys and values of earlier positions",
        "are kept from the steps before, so a step costs one position, not all of them (same numbers: checks).",
        f"tformer.decoding.greedy_search gives: {' '.join(d.module_tokens)}   (log-probability "
        f"{d.module_log_prob:.4f}, accumulated in float32)",
    ]
    return lines


# ---------------------------------------------------------------------------------------------- figures
OUTLINED = [patheffects.withStroke(linewidth=2, foreground="black")]  # white text readable on any colour


def annotated(
    ax: Axes,
    values: Tensor,
    rows: Sequence[str],
    cols: Sequence[str],
    title: str,
    *,
    decimals: int = 2,
    axis_names: tuple[str, str] | None = None,
    **imshow,
) -> None:
    """A heat map with its numbers written in; `axis_names` (rows, columns), e.g. ("query", "key")."""
    data = values.detach().double().numpy()
    ax.imshow(data, aspect="auto", interpolation="nearest", **imshow)
    ax.set_xticks(range(len(cols)), labels=cols, rotation=90 if len(cols) > 4 else 0, fontsize=8)
    ax.set_yticks(range(len(rows)), labels=rows, fontsize=8)
    ax.set_title(title, fontsize=9)
    if axis_names is not None:
        ax.set_ylabel(axis_names[0], fontsize=8)
        ax.set_xlabel(axis_names[1], fontsize=8)
    if data.size <= 64:
        for (i, j), value in np.ndenumerate(data):
            ax.text(
                j,
                i,
                f"{value:.{decimals}f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white",
                path_effects=OUTLINED,
            )


def figure_grid(n_rows: int, n_cols: int, title: str, *, panel: float = 3.2) -> tuple[Figure, np.ndarray]:
    figure = Figure(figsize=(panel * n_cols, panel * n_rows + 0.6), layout="constrained")
    figure.suptitle(title)
    return figure, figure.subplots(n_rows, n_cols, squeeze=False)


def self_attention_figure(w: Walkthrough) -> Figure:
    a, src = w.attention, w.source_tokens
    figure, axes = figure_grid(w.config.n_heads, 2, "encoder self-attention: scores, then softmax")
    # scores: a diverging map centred on 0 (red positive, blue negative), the same scale for every head
    limit = float(a.scores_HSS.abs().max())
    for h in range(w.config.n_heads):
        names = ("query", "key")
        title = f"head {h}: q·k / sqrt(d_k)"
        scores = {"cmap": "coolwarm", "vmin": -limit, "vmax": limit}
        annotated(axes[h, 0], a.scores_HSS[h], src, src, title, axis_names=names, **scores)
        title = f"head {h}: softmax (rows sum to 1)"
        annotated(axes[h, 1], a.weights_HSS[h], src, src, title, axis_names=names, cmap="viridis", vmin=0, vmax=1)
    return figure


def encoder_block_figure(w: Walkthrough) -> Figure:
    b, src, labels = w.encoder_block, w.source_tokens, dims(w.config.d_model)
    stages = (
        ("x = embedding + position", b.input_SD),
        ("self-attention output", b.attention_SD),
        ("layer norm(x + attention)", b.after_attention_SD),
        ("feed-forward output", b.feed_forward_SD),
        ("block output", b.output_SD),
    )
    figure, axes = figure_grid(1, len(stages), "one encoder block, vector by vector", panel=3.4)
    for ax, (title, values) in zip(axes[0], stages, strict=True):
        annotated(ax, values, src, labels, title, cmap="coolwarm", vmin=-3, vmax=3)
    return figure


def decoder_figure(w: Walkthrough) -> Figure:
    tin, src, H = w.decoder_inputs, w.source_tokens, w.config.n_heads
    figure, axes = figure_grid(2, H + 1, "decoder: causal mask, masked self-attention, cross-attention")
    self_names = ("query (decoder input)", "key (decoder input)")
    cross_names = ("query (decoder input)", "key (source)")
    mask_title = "causal mask (1 = may attend)"
    annotated(
        axes[0, 0], w.causal.mask_TT.double(), tin, tin, mask_title, axis_names=self_names, cmap="Greys_r", decimals=0
    )
    axes[1, 0].axis("off")
    for h in range(H):
        title = f"masked self-attn, head {h}"
        annotated(axes[0, h + 1], w.causal.weights_HTT[h], tin, tin, title, axis_names=self_names, vmin=0, vmax=1)
        title = f"cross-attention, head {h}"
        annotated(axes[1, h + 1], w.cross.weights_HTS[h], tin, src, title, axis_names=cross_names, vmin=0, vmax=1)
    return figure


def loss_figure(w: Walkthrough) -> Figure:
    loss = w.loss
    figure = Figure(figsize=(12, 4), layout="constrained")
    ax, schedule_ax = figure.subplots(1, 2)
    labels = [f"{i} → {t}" for i, t in zip(w.decoder_inputs, w.decoder_targets, strict=True)]
    bars = ax.bar(labels, loss.target_probability_T.numpy(), color="tab:blue")
    for bar, nll in zip(bars, loss.nll_T.numpy(), strict=True):
        ax.annotate(
            f"-log p = {nll:.2f}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.axhline(1 / w.config.tgt_vocab_size, color="gray", linestyle="--", label="uniform guess")
    ax.set_ylim(0, max(0.3, 1.25 * float(loss.target_probability_T.max())))
    ax.set_ylabel("p(correct next token)")
    ax.set_title(
        f"cross-entropy {loss.loss:.3f} (label-smoothed {loss.smoothed_loss:.3f}); "
        f"after one Adam step {loss.loss_after_step:.3f}",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    curve = loss.schedule_curve.numpy()
    schedule_ax.plot(curve[:, 0], curve[:, 1], color="tab:orange")
    shown = [(step, rate) for step, rate in loss.schedule.items() if step <= curve[-1, 0]]  # the printed ones
    schedule_ax.plot(*zip(*shown, strict=True), "o", color="tab:orange")
    schedule_ax.set_xlabel("step")
    schedule_ax.set_ylabel("learning rate")
    schedule_ax.set_title("the paper's learning rate, base model (d_model 512, warm-up 4000)", fontsize=10)
    schedule_ax.grid(alpha=0.3)
    return figure


def decoding_figure(w: Walkthrough) -> Figure:
    d = w.decoding
    figure = Figure(figsize=(7.5, 1.2 + 0.6 * len(d.prefixes)), layout="constrained")
    ax = figure.subplots()
    rows = [f"{' '.join(prefix)} → {chosen}" for prefix, chosen in zip(d.prefixes, d.chosen, strict=True)]
    title, names = "greedy decoding: p(next token) at each step", ("decoder input → token chosen", "next token")
    annotated(ax, d.probabilities_NV, rows, list(VOCABULARY), title, axis_names=names, vmin=0, vmax=1)
    return figure


FIGURES: dict[str, Callable[[Walkthrough], Figure]] = {
    "self_attention.png": self_attention_figure,
    "encoder_block.png": encoder_block_figure,
    "decoder_attention.png": decoder_figure,
    "cross_entropy.png": loss_figure,
    "decoding.png": decoding_figure,
}
POSITIONAL_FIGURE = "positional_encoding.png"
FIGURE_NAMES = (POSITIONAL_FIGURE, *FIGURES)  # every file save_figures writes


def save_figures(w: Walkthrough, out_dir: str | Path) -> list[Path]:
    """Write the walk-through's figures (FIGURE_NAMES) into `out_dir`, made if needed, replacing any there.
    A write that fails (a full disk) removes the figures this call added and the folders it made: the first
    figures, left, made a rerun refuse `--out` as already holding figures, as a partial download did."""
    out_dir = Path(out_dir)
    added = [out_dir / name for name in FIGURE_NAMES if not (out_dir / name).exists()]
    with directories_made(out_dir):  # what else is there stays
        try:
            written = [save_positional_png(out_dir / POSITIONAL_FIGURE)]
            for name, make in FIGURES.items():
                written.append(save_png(make(w), out_dir / name))  # an interrupted write keeps the one there before
        except BaseException:
            for path in added:
                path.unlink(missing_ok=True)
            raise
    return written
