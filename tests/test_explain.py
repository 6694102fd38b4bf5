"""The explain walk-through: every number it shows equals what tformer's modules compute."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_viz_attention import assert_png

from tformer.cli.main import main
from tformer.explain import VOCABULARY, Walkthrough, toy_config, walkthrough
from tformer.explain_report import render, save_figures
from tformer.model import Transformer


@pytest.fixture(scope="module")
def result() -> Walkthrough:
    return walkthrough(seed=3)


@pytest.fixture(scope="module")
def model() -> Transformer:
    """The same model the walk-through built, rebuilt independently from the same seed."""
    return Transformer(toy_config(), seed=3).double().eval()


def test_the_example_is_four_tokens_of_eight_dimensions_in_two_heads(result: Walkthrough) -> None:
    assert result.source_tokens == ["the", "cat", "sat", "</s>"]
    assert result.config.d_model == 8 and result.config.n_heads == 2
    assert result.attention.q_HSK.shape == (2, 4, 4)
    assert result.attention.scores_HSS.shape == (2, 4, 4)


def test_step_by_step_self_attention_equals_the_module(result: Walkthrough, model: Transformer) -> None:
    layer = model.encoder.layers[0]
    src = torch.tensor([[VOCABULARY.index(token) for token in result.source_tokens]])
    with torch.no_grad():
        x = model.src_embedding(src) + model.encoder.positions(src.shape[1])
        expected, _ = layer.self_attention(x, mask=None)
        block, _ = layer(x, mask=None)
    torch.testing.assert_close(result.embeddings_SD + result.positions_SD, x[0], atol=1e-12, rtol=0)
    # the hand-computed weighted sums, concatenated and projected, are SelfAttention.forward
    by_hand = layer.self_attention.out_proj(result.attention.heads_HSK.transpose(0, 1).reshape(4, 8))
    torch.testing.assert_close(by_hand.detach(), expected[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(result.attention.output_SD, expected[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(result.encoder_block.output_SD, block[0], atol=1e-6, rtol=0)


def test_scores_are_scaled_dot_products_and_weights_their_softmax(result: Walkthrough) -> None:
    a = result.attention
    head, query, key = 1, 2, 0
    assert float(a.scores_HSS[head, query, key]) == pytest.approx(float(a.q_HSK[head, query] @ a.k_HSK[head, key]) / 2)
    torch.testing.assert_close(a.weights_HSS.sum(dim=-1), torch.ones(2, 4, dtype=torch.float64))
    torch.testing.assert_close(a.weights_HSS, a.matrix_weights_HSS, atol=1e-12, rtol=0)


def test_every_check_agrees_to_float64_precision(result: Walkthrough) -> None:
    assert len(result.checks) >= 10
    assert all(difference < 1e-10 for difference in result.checks.values()), result.checks


def test_causal_and_cross_attention(result: Walkthrough) -> None:
    causal = result.causal
    assert torch.equal(causal.mask_TT, torch.ones(4, 4, dtype=torch.bool).tril())
    assert torch.all(causal.weights_HTT.triu(diagonal=1) == 0)
    torch.testing.assert_close(causal.weights_HTT[:, 0, 0], torch.ones(2, dtype=torch.float64))  # <s> sees itself
    assert result.cross.weights_HTS.shape == (2, 4, 4)
    torch.testing.assert_close(result.cross.memory_SD, result.encoder_block.output_SD)


def test_cross_entropy_is_the_mean_negative_log_probability_and_a_step_lowers_it(result: Walkthrough) -> None:
    loss = result.loss
    assert loss.loss == pytest.approx(float(loss.nll_T.mean()))
    assert loss.loss == pytest.approx(loss.module_loss)
    assert loss.loss_after_step < loss.loss


def test_label_smoothing_and_the_learning_rate_are_the_papers(result: Walkthrough) -> None:
    """Smoothing against its definition (target distribution (1 - eps) one-hot + eps/V, cross-entropy with
    it), the schedule against the paper's eq. (3), both written out here."""
    loss, eps, V = result.loss, 0.1, result.config.tgt_vocab_size
    targets_T = torch.tensor([VOCABULARY.index(token) for token in result.decoder_targets])
    smoothed_target_TV = torch.full((len(targets_T), V), eps / V, dtype=torch.float64)
    smoothed_target_TV[torch.arange(len(targets_T)), targets_T] += 1 - eps
    expected_T = -(smoothed_target_TV * torch.log_softmax(loss.logits_TV, dim=-1)).sum(dim=-1)
    assert loss.smoothing == eps
    torch.testing.assert_close(loss.smoothed_T, expected_T, atol=1e-12, rtol=0)
    assert loss.smoothed_loss == pytest.approx(float(expected_T.mean()), abs=1e-12)
    assert loss.module_smoothed_loss == pytest.approx(loss.smoothed_loss, abs=1e-12)
    assert list(loss.schedule) == [1, 1000, 4000, 16_000, 100_000]
    for step, rate in [*loss.schedule.items(), *loss.schedule_curve.tolist()]:
        assert rate == pytest.approx(512**-0.5 * min(step**-0.5, step * 4000**-1.5), rel=1e-12)
    assert int(loss.schedule_curve[loss.schedule_curve[:, 1].argmax(), 0]) == 4000  # the peak ends the warm-up


def test_autoregressive_decoding_feeds_back_each_choice_and_equals_the_cached_search(result: Walkthrough) -> None:
    d = result.decoding
    assert d.loss_after_training < result.loss.loss_after_step < result.loss.loss
    assert d.chosen == ["le", "chat", "s'assit", "</s>"]  # the trained copy translates the pair it learned
    for step, prefix in enumerate(d.prefixes):  # each step reads <s> and every token chosen before it
        assert prefix == ["<s>", *d.chosen[:step]]
        assert VOCABULARY[int(d.probabilities_NV[step].argmax())] == d.chosen[step]
    torch.testing.assert_close(d.probabilities_NV.sum(dim=-1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(d.cached_probabilities_NV, d.probabilities_NV, atol=1e-12, rtol=0)
    chosen_ids = torch.tensor([VOCABULARY.index(token) for token in d.chosen])
    assert d.log_prob == pytest.approx(float(d.probabilities_NV.gather(1, chosen_ids[:, None]).log().sum()))
    assert d.module_tokens == d.chosen[:-1]  # greedy_search: the same tokens (eos left out) ...
    assert d.module_log_prob == pytest.approx(d.log_prob, abs=1e-6)  # ... and log-probability (float32)


def test_seed_changes_the_numbers_and_is_reproducible(result: Walkthrough) -> None:
    assert torch.equal(walkthrough(seed=3).attention.scores_HSS, result.attention.scores_HSS)
    assert not torch.equal(walkthrough(seed=4).attention.scores_HSS, result.attention.scores_HSS)


def test_report_prints_every_step_and_figures_decode(result: Walkthrough, tmp_path: Path) -> None:
    text = render(result)
    steps = ("== 1.", "== 3.", "== 6.", "== 8.", "== 9.", "== 10.", "label smoothing", "warmup", "== 11.", "== checks")
    for step in (*steps, "worked example", "teacher forcing", "masks.additive_mask", "project_output"):
        assert step in text
    # the written-out softmax and weighted sum of step 4 and 5 add up to the numbers of their tables
    softmax_line = text.split("e^(", 1)[1].splitlines()[0]
    weight, value = float(softmax_line.split("=")[-1]), float(result.attention.weights_HSS[0, 1].max())
    assert weight == pytest.approx(value, abs=5e-4)
    sum_line = text.split("weight x value:\n", 1)[1].splitlines()[0]
    terms, total = sum_line.split("=")
    products = [float(a) * float(b) for a, b in (t.strip(" ()").split(")(") for t in terms.split(" + "))]
    assert sum(products) == pytest.approx(float(total), abs=5e-3)
    paths = save_figures(result, tmp_path)
    assert [path.name for path in paths] == [
        "positional_encoding.png",
        "self_attention.png",
        "encoder_block.png",
        "decoder_attention.png",
        "cross_entropy.png",
        "decoding.png",
    ]
    for path in paths:
        assert_png(path, min_width=500, min_height=300)


def test_cli_prints_the_walkthrough_and_writes_figures(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["explain", "--seed", "1", "--out", str(tmp_path / "figs")]) == 0
    output = capsys.readouterr().out
    assert "q·k / sqrt(4)" in output and "softmax" in output
    assert len(list((tmp_path / "figs").glob("*.png"))) == 6


def test_cli_keeps_the_figures_of_an_earlier_out_unless_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """explain --out replaced the figures a directory held without a word, while align, translate and
    evaluate keep an existing output unless --overwrite."""
    figures = tmp_path / "figs"
    figures.mkdir()
    earlier = figures / "decoding.png"
    earlier.write_bytes(b"an earlier figure")
    assert main(["explain", "--out", str(figures)]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        f"error: --out: {earlier} exists; pass --overwrite to replace them, or choose another directory\n"
    )
    assert captured.out == ""  # refused before the walk-through is printed
    assert sorted(figures.iterdir()) == [earlier] and earlier.read_bytes() == b"an earlier figure"
    assert main(["explain", "--out", str(figures), "--overwrite"]) == 0
    assert len(list(figures.glob("*.png"))) == 6 and earlier.read_bytes() != b"an earlier figure"
    capsys.readouterr()
    assert main(["explain", "--out", str(figures)]) == 2
    assert "exists (and 5 more of the files it writes); pass --overwrite" in capsys.readouterr().err


def test_an_interrupted_figure_write_keeps_the_file_that_was_there(
    result: Walkthrough, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while `explain --out` writes its figures: matplotlib had opened the file itself and cut it
    short, so the figure drawn before was lost and a truncated PNG took its place."""
    from matplotlib.figure import Figure

    before = b"the figure of an earlier run"
    (tmp_path / "positional_encoding.png").write_bytes(before)

    def interrupted(figure: Figure, target: object, **kwargs: object) -> None:
        if isinstance(target, (str, Path)):
            Path(target).write_bytes(b"\x89PNG cut short")
        else:
            target.write(b"\x89PNG cut short")  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_figures(result, tmp_path)
    assert (tmp_path / "positional_encoding.png").read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["positional_encoding.png"]  # no partial file


def test_score_colours_are_centred_on_zero(result: Walkthrough) -> None:
    """The scores' diverging map (coolwarm) was stretched between each head's own lowest and highest
    score, so its neutral colour sat at their midpoint, not at 0, and positive scores came out blue."""
    from tformer.explain_report import self_attention_figure

    figure = self_attention_figure(result)
    limit = float(result.attention.scores_HSS.abs().max())
    for ax in figure.axes[0::2]:  # the score panels; the softmax panels beside them keep 0 .. 1
        norm = ax.images[0].norm
        assert (norm.vmin, norm.vmax) == pytest.approx((-limit, limit))
    for ax in figure.axes[1::2]:
        assert (ax.images[0].norm.vmin, ax.images[0].norm.vmax) == (0, 1)


def test_the_input_tables_say_what_their_numbers_are(result: Walkthrough, model: Transformer) -> None:
    """Step 1's first table was labelled "token embedding", but holds the embedding matrix's rows times
    sqrt(d_model): a reader checking it against the weights found other numbers."""
    lines = render(result).splitlines()
    label = next(i for i, line in enumerate(lines) if line.startswith("token embedding"))
    assert "x sqrt(8)" in lines[label] and "2.828" in lines[label]
    printed = [[float(cell) for cell in line.split()[1:]] for line in lines[label + 2 : label + 6]]
    rows = model.src_embedding.weight.detach()[[VOCABULARY.index(token) for token in result.source_tokens]]
    torch.testing.assert_close(torch.tensor(printed, dtype=torch.float64), rows * 8**0.5, atol=5e-4, rtol=0)
    position = lines[label + 6]
    assert position.startswith("position") and "sin(pos / 10000^(2i/8))" in position
    printed = [[float(cell) for cell in line.split()[1:]] for line in lines[label + 8 : label + 12]]
    paper_PD = [
        [f(pos / 10000 ** (2 * (d // 2) / 8)) for d, f in enumerate([math.sin, math.cos] * 4)] for pos in range(4)
    ]
    torch.testing.assert_close(torch.tensor(printed), torch.tensor(paper_PD), atol=5e-4, rtol=0)


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_cli_refuses_a_directory_where_a_figure_goes(
    tmp_path: Path, capsys: pytest.CaptureFixture, overwrite: list[str]
) -> None:
    """A directory named decoding.png in --out: with --overwrite, the walk-through was printed and five
    figures written before renaming the sixth over the directory failed with an errno message."""
    figures = tmp_path / "figs"
    (figures / "decoding.png").mkdir(parents=True)
    assert main(["explain", "--out", str(figures), *overwrite]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        f"error: --out: {figures / 'decoding.png'} is a directory, where a file goes; move it, or choose another "
        "directory\n"
    )
    assert captured.out == "" and sorted(figures.iterdir()) == [figures / "decoding.png"]


def test_the_decoding_figure_names_its_axes(result: Walkthrough) -> None:
    """The decoding heat map had tokens on both axes but no axis names, unlike the attention figures: which
    were the inputs and which the candidates for the next token was left to guess."""
    from tformer.explain_report import decoding_figure

    ax = decoding_figure(result).axes[0]
    assert (ax.get_ylabel(), ax.get_xlabel()) == ("decoder input → token chosen", "next token")


def test_a_failed_figure_write_leaves_no_partial_set_to_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk at the third figure left the first two (and --out, which explain made): the same command
    run again was refused, --out holding figures already."""
    import errno

    from tformer import explain_report

    save_png, saved = explain_report.save_png, []

    def third_fails(figure: object, path: Path, **kwargs: object) -> Path:
        saved.append(path)
        if len(saved) == 2:  # the positional figure is the first, written by another function
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save_png(figure, path, **kwargs)

    monkeypatch.setattr(explain_report, "save_png", third_fails)
    out = tmp_path / "new" / "figs"
    assert main(["explain", "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: [Errno 28] No space left on device: '{saved[-1]}'\n"
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert main(["explain", "--out", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == 6
