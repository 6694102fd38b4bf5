"""Word alignments from cross-attention: subword pieces to words, Pharaoh output, and the identity
alignment of a model trained to copy its input."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tformer.align as align_module
from tformer.align import (
    AlignmentError,
    align_files,
    align_pairs,
    hard_alignment,
    layer_index,
    pharaoh,
    piece_words,
    word_scores,
)
from tformer.cli.main import main
from tformer.config import ExperimentConfig, preset
from tformer.data.tokenizer import Tokenizer
from tformer.model import Transformer
from tformer.training.checkpoint import step_name
from tformer.training.checkpoint_save import save_checkpoint, write_pointer

WORDS = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "abc", "fed", "hij", "mop"]


def test_pieces_map_to_whitespace_words() -> None:
    assert piece_words(["▁m", "n", "▁ab", "▁", "ij", "▁x"]) == [0, 0, 1, 2, 2, 3]
    assert piece_words(["ab", "c", "▁d"]) == [0, 0, 1]  # a first piece without ▁ still starts word 0


def test_word_scores_sum_source_pieces_and_average_target_pieces() -> None:
    cross_TS = np.array(
        [
            [0.1, 0.2, 0.7],  # target piece 0 (word 0)
            [0.3, 0.3, 0.4],  # target piece 1 (word 0)
            [0.6, 0.3, 0.1],  # target piece 2 (word 1)
        ]
    )
    scores_JI = word_scores(cross_TS, src_words_S=[0, 0, 1], tgt_words_T=[0, 0, 1])
    np.testing.assert_allclose(scores_JI, [[(0.3 + 0.6) / 2, (0.7 + 0.4) / 2], [0.9, 0.1]])
    assert hard_alignment(scores_JI) == [(0, 1), (1, 0)]
    assert pharaoh([(0, 1), (1, 0)]) == "0-1 1-0"


def test_layer_choice_defaults_to_the_penultimate() -> None:
    assert layer_index(6, None) == 4
    assert layer_index(1, None) == 0
    assert layer_index(6, -1) == 5
    with pytest.raises(AlignmentError, match=r"layers 0\.\.5"):
        layer_index(6, 6)


def random_sentences(rng: random.Random, count: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7))) for _ in range(count)]


@pytest.fixture(scope="module")
def copy_model() -> tuple[Transformer, Tokenizer]:
    """A one-layer, one-head model trained to copy its input, over a tokenizer that splits some words."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models train faster on one thread than on two contended ones
    try:
        rng = random.Random(0)
        sentences = random_sentences(rng, 400)
        tokenizer = Tokenizer.train(sentences, sentences, vocab_size=26)
        size = tokenizer.src_vocab_size
        config = preset(
            "tiny", src_vocab_size=size, tgt_vocab_size=size, n_heads=1, n_encoder_layers=1, n_decoder_layers=1
        )
        model = Transformer(config, seed=0)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        encoded = tokenizer.encode_sources(sentences)
        generator = torch.Generator().manual_seed(0)
        for _ in range(500):
            batch = [encoded[i] for i in torch.randint(len(encoded), (32,), generator=generator).tolist()]
            width = max(len(ids) for ids in batch) + 1
            src = torch.tensor([ids + [2] + [0] * (width - len(ids) - 1) for ids in batch])
            tgt_in = torch.tensor([[1, *ids] + [0] * (width - len(ids) - 1) for ids in batch])
            loss = F.cross_entropy(model(src, tgt_in).flatten(0, 1), src.flatten(), ignore_index=0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(before)
    return model.eval(), tokenizer


def test_a_copy_model_aligns_every_word_to_itself(copy_model: tuple[Transformer, Tokenizer]) -> None:
    model, tokenizer = copy_model
    sentences = random_sentences(random.Random(1), 20)
    assert any(len(tokenizer.source_pieces(s)) > len(s.split()) for s in sentences)  # subwords are exercised
    alignments = align_pairs(model, tokenizer, [(s, s) for s in sentences])
    for sentence, links in zip(sentences, alignments, strict=True):
        assert links == [(i, i) for i in range(len(sentence.split()))], sentence


def test_align_files_writes_one_pharaoh_line_per_pair(
    copy_model: tuple[Transformer, Tokenizer], tmp_path: Path
) -> None:
    model, tokenizer = copy_model
    lines = ["ab cd ef", "", "mop  hij"]  # an empty pair and a double space
    (tmp_path / "src").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (tmp_path / "tgt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert list(align_files(model, tokenizer, tmp_path / "src", tmp_path / "tgt")) == ["0-0 1-1 2-2", "", "0-0 1-1"]
    (tmp_path / "short").write_text("ab\n", encoding="utf-8")
    with pytest.raises(AlignmentError, match="has 3 lines but"):
        list(align_files(model, tokenizer, tmp_path / "src", tmp_path / "short"))
    with pytest.raises(AlignmentError, match="no such file"):
        list(align_files(model, tokenizer, tmp_path / "missing", tmp_path / "tgt"))
    with pytest.raises(ValueError, match=f"expected a file but got a directory: {tmp_path}"):  # not "no such file"
        list(align_files(model, tokenizer, tmp_path, tmp_path / "tgt"))
    read, write = os.pipe()  # --src /dev/stdin: a pipe, not a regular file
    os.write(write, b"ab cd ef\n\nmop  hij\n")
    os.close(write)
    assert list(align_files(model, tokenizer, f"/dev/fd/{read}", tmp_path / "tgt")) == ["0-0 1-1 2-2", "", "0-0 1-1"]
    os.close(read)


def saved_run(copy_model: tuple[Transformer, Tokenizer], run_dir: Path) -> Path:
    model, tokenizer = copy_model
    name = step_name(1)
    experiment = ExperimentConfig(model=model.config)
    save_checkpoint(run_dir, name, experiment=experiment, tokenizer=tokenizer, model=model, step=1, trainer_state=None)
    write_pointer(run_dir, "latest", name)
    return run_dir


def test_align_command_splits_lines_on_newline_only(copy_model: tuple[Transformer, Tokenizer], tmp_path: Path) -> None:
    """U+2028, U+0085 and a form feed are whitespace inside a sentence, not line breaks (str.splitlines
    would break on them and shift every later pair)."""
    saved_run(copy_model, tmp_path / "run")
    lines = ["ab cd\u2028ef", "gh\x85ij", "kl mn\x0cop", "abc fed\r"]
    for side in ("src", "tgt"):
        (tmp_path / side).write_text("\n".join(lines) + "\n", encoding="utf-8", newline="")
    arguments = ["align", str(tmp_path / "run"), "--src", str(tmp_path / "src"), "--tgt", str(tmp_path / "tgt")]
    assert main([*arguments, "--out", str(tmp_path / "out")]) == 0
    written = (tmp_path / "out").read_text(encoding="utf-8")
    assert written == "0-0 1-1 2-2\n0-0 1-1\n0-0 1-1 2-2\n0-0 1-1\n"


@pytest.mark.parametrize("flag", ["--src", "--tgt"])
def test_align_refuses_to_write_over_its_input(
    copy_model: tuple[Transformer, Tokenizer], tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    """--out naming the --src or --tgt file would replace the sentences with their alignments."""
    run = saved_run(copy_model, tmp_path / "run")
    for side in ("src", "tgt"):
        (tmp_path / side).write_text("ab cd\n", encoding="utf-8")
    arguments = ["align", str(run), "--src", str(tmp_path / "src"), "--tgt", str(tmp_path / "tgt")]
    out = tmp_path / flag.removeprefix("--")
    assert main([*arguments, "--out", str(out)]) == 2
    assert (
        capsys.readouterr().err
        == f"error: --out {out} is the {flag} file: writing would erase it; choose another file\n"
    )
    assert out.read_text(encoding="utf-8") == "ab cd\n"


def test_align_keeps_an_existing_out_unless_overwrite(
    copy_model: tuple[Transformer, Tokenizer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An earlier --out (alignments of a large corpus, say: hours to make again) is kept, as translate and
    evaluate keep an existing --output; it was replaced without a word."""
    run = saved_run(copy_model, tmp_path / "run")
    for side in ("src", "tgt"):
        (tmp_path / side).write_text("ab cd\n", encoding="utf-8")
    out = tmp_path / "earlier.align"
    out.write_text("0-1 1-0\n", encoding="utf-8")
    arguments = ["align", str(run), "--src", str(tmp_path / "src"), "--tgt", str(tmp_path / "tgt"), "--out", str(out)]
    assert main(arguments) == 2
    assert capsys.readouterr().err == (
        f"error: --out: {out} exists; pass --overwrite to replace it, or choose another file\n"
    )
    assert out.read_text(encoding="utf-8") == "0-1 1-0\n"
    assert main([*arguments, "--overwrite"]) == 0
    assert out.read_text(encoding="utf-8") == "0-0 1-1\n"


def test_align_names_a_line_too_long_for_the_model_before_writing_any(
    copy_model: tuple[Transformer, Tokenizer], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A line longer than the model's positions stopped align at the batch that held it, with the batches
    before already on standard output, in a message that named neither the file nor the line (and advised
    raising model.max_positions, which a trained model cannot)."""
    model, tokenizer = copy_model
    run = saved_run(copy_model, tmp_path / "run")
    limit = model.config.max_positions
    word = next(word for word in WORDS if len(tokenizer.encode_target(word)) == 1)
    fits = " ".join([word] * (limit - 1))  # with <s> (or </s> on the source side): exactly the limit
    too_long = f"{fits} {word}"
    (tmp_path / "short").write_text("ab cd\n" * 41, encoding="utf-8")
    (tmp_path / "long").write_text("ab cd\n" * 40 + too_long + "\n", encoding="utf-8")
    for flags in (["--src", "long", "--tgt", "short"], ["--src", "short", "--tgt", "long"]):
        arguments = [str(tmp_path / flag) if not flag.startswith("--") else flag for flag in flags]
        assert main(["align", str(run), *arguments]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        expected = f"{tmp_path / 'long'} line 41 has {limit + 1} tokens; the model accepts at most {limit}: shorten it"
        assert captured.err == f"error: {expected}\n"
    (tmp_path / "fits").write_text(fits + "\n", encoding="utf-8")
    (tmp_path / "one").write_text("ab\n", encoding="utf-8")
    assert main(["align", str(run), "--src", str(tmp_path / "fits"), "--tgt", str(tmp_path / "one")]) == 0
    assert main(["align", str(run), "--src", str(tmp_path / "one"), "--tgt", str(tmp_path / "fits")]) == 0


def test_a_pair_whose_pieces_do_not_map_is_named_by_its_number_in_the_whole_list(
    copy_model: tuple[Transformer, Tokenizer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The error counted pairs from the batch's start plus every pair aligned before (so pair 35, in the
    second batch of 32, was called pair 67); it is the pair's 1-based number in the list (a file's line)."""
    model, tokenizer = copy_model
    sentences = random_sentences(random.Random(2), 40)
    real, calls = align_module.piece_words, []

    def breaking_pair_35(pieces):  # two calls a pair (source, then target): the 69th is pair 35's source
        calls.append(None)
        words = real(pieces)
        return [*words, words[-1] + 1] if len(calls) == 69 else words

    monkeypatch.setattr(align_module, "piece_words", breaking_pair_35)
    with pytest.raises(AlignmentError, match=r"^pair 35: subword pieces do not map onto whitespace words$"):
        align_pairs(model, tokenizer, [(s, s) for s in sentences])


def test_links_count_the_words_as_given_not_as_normalised(copy_model: tuple[Transformer, Tokenizer]) -> None:
    """fast_align, awesome-align and a reference alignment number the whitespace tokens of the line given.
    NFKC makes two words of "don´t" and none of a lone "▁": numbered after it, every later link was off."""
    assert align_module.word_origins("don\u00b4t go") == [0, 0, 1]  # "don ́t go": three words after NFKC
    assert align_module.word_origins("ab \u2581 cd") == [0, 2]
    model, tokenizer = copy_model
    pairs = [("ab cd ef", "ab \u2581 cd ef"), ("\u2581 ab", "ab"), ("ab cd", "ab \u2581")]
    assert align_pairs(model, tokenizer, pairs) == [[(0, 0), (1, 2), (2, 3)], [(1, 0)], [(0, 0)]]


def test_align_warns_that_text_without_spaces_is_one_word_a_sentence(
    copy_model: tuple[Transformer, Tokenizer], tmp_path: Path
) -> None:
    """Chinese run together is one whitespace word a sentence, every link to word 0, which aligned silently;
    the same text split into words, and Latin text with a few such characters, gets no warning."""
    model, tokenizer = copy_model
    (tmp_path / "src").write_text("ab cd ef\nmop hij\n", encoding="utf-8")
    (tmp_path / "zh").write_text("我有八十三万个苹果。\n七千二百三十在GPU上\n", encoding="utf-8")
    (tmp_path / "segmented").write_text("我 有 八十三万 个 苹果 。\n七千二百三十 在 GPU 上\n", encoding="utf-8")
    (tmp_path / "mixed").write_text("ab 猫\ncd ef\n", encoding="utf-8")
    with pytest.warns(UserWarning, match=r"zh is mostly Chinese, Japanese or Thai written without spaces .* jieba"):
        assert len(list(align_files(model, tokenizer, tmp_path / "src", tmp_path / "zh"))) == 2
    for quiet in ("segmented", "mixed"):
        assert align_module.segmentation_advice(tmp_path / quiet, (tmp_path / quiet).read_text().split("\n")) == ""
