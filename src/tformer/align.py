"""Word alignments from cross-attention, in Pharaoh format (`i-j`: source word i to target word j, 0-based).

For each sentence pair the model reads the source and the *given* target (teacher forcing, one batched
forward pass) and returns its cross-attention. Then:

1. one T x S matrix: the chosen decoder layer (default: the penultimate one, which Garg et al. 2019,
   "Jointly Learning to Align and Translate with Transformer Models", found the most alignment-like;
   the only one in a one-layer decoder), averaged over all its heads. Row j is the step that *predicts*
   target piece j (its decoder input is piece j-1), so it shows where the model looked to write it;
2. the source </s> column and the final </s> row are dropped;
3. subwords to words: words are the whitespace tokens of the sentence as given (what fast_align and a
   reference alignment count), each the one or more words normalisation makes of it (`word_origins`); a
   piece starting with "▁" begins a normalised word. Attention is *summed* over the pieces of a source
   word (how much of the row goes to that word) and *averaged* over the pieces of a target word;
4. hard alignment: each target word is linked to the source word it attends to most (a word normalisation
   leaves nothing of, a lone "▁", has no piece and no link).

Shape legend: B batch, L layers, H heads, S source pieces, T target pieces, I source words, J target words.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from tformer.caller_warnings import warn_caller
from tformer.data import corpus
from tformer.data.piece_floor import surely_too_long
from tformer.data.scripts import counts_mostly_unspaced, unspaced_letters
from tformer.data.tokenizer import normalize
from tformer.model import Transformer
from tformer.model.modes import evaluating

WORD_START = "\u2581"
BATCH_SIZE = 32
UNSEGMENTED_LETTERS = 6  # letters of an unspaced script per whitespace word, above which text is unsegmented


class AlignmentError(ValueError):
    """Inputs that cannot be aligned as given; the message says which file or line."""


def piece_words(pieces: Sequence[str]) -> list[int]:
    """The word index of each piece: a piece starting with "▁" begins a new word."""
    words, current = [], -1
    for piece in pieces:
        if piece.startswith(WORD_START) or current < 0:
            current += 1
        words.append(current)
    return words


def word_scores(cross_TS: np.ndarray, src_words_S: Sequence[int], tgt_words_T: Sequence[int]) -> np.ndarray:
    """Word-level attention J x I: summed over a source word's pieces, averaged over a target word's."""
    n_src, n_tgt = max(src_words_S) + 1, max(tgt_words_T) + 1
    summed_TI = np.zeros((cross_TS.shape[0], n_src))
    np.add.at(summed_TI.T, np.asarray(src_words_S), cross_TS.T)
    scores_JI = np.zeros((n_tgt, n_src))
    np.add.at(scores_JI, np.asarray(tgt_words_T), summed_TI)
    counts_J = np.bincount(np.asarray(tgt_words_T), minlength=n_tgt)
    return scores_JI / np.maximum(counts_J, 1)[:, None]  # a word without pieces: a row of zeros, not 0/0


def hard_alignment(scores_JI: np.ndarray) -> list[tuple[int, int]]:
    """(source word, target word) pairs: each target word to its highest-scoring source word."""
    return sorted((int(np.argmax(row)), j) for j, row in enumerate(scores_JI))


def word_origins(text: str) -> list[int]:
    """For each word of normalize(text), the index of the whitespace token of `text` it comes from. NFKC
    makes two words of some tokens (the acute accent of "don´t" becomes a space and a combining accent) and
    none of a lone "▁": numbered after normalisation, every later word's index was off by one."""
    return [index for index, token in enumerate(text.split()) for _ in normalize(token).split()]


def pharaoh(pairs: Sequence[tuple[int, int]]) -> str:
    return " ".join(f"{i}-{j}" for i, j in pairs)


def layer_index(n_layers: int, layer: int | None) -> int:
    """The chosen decoder layer; None means the penultimate one (the only one if there is one)."""
    if layer is None:
        return max(n_layers - 2, 0)
    if not -n_layers <= layer < n_layers:
        raise AlignmentError(f"layer {layer} does not exist; the decoder has layers 0..{n_layers - 1}")
    return layer % n_layers


@torch.no_grad()
def cross_attention_batch(
    model: Transformer, src: list[list[int]], tgt_in: list[list[int]], *, layer: int, pad_id: int
) -> list[np.ndarray]:
    """Head-averaged cross-attention of `layer`, one (T_b x S_b) array per pair, padding cut away."""
    device = next(model.parameters()).device

    def padded(rows: list[list[int]]) -> torch.Tensor:
        width = max(len(row) for row in rows)
        return torch.tensor([row + [pad_id] * (width - len(row)) for row in rows], dtype=torch.long, device=device)

    src_BS, tgt_BT = padded(src), padded(tgt_in)
    tgt_lengths = torch.tensor([len(row) for row in tgt_in], device=device)
    tgt_pad_mask_BT = torch.arange(tgt_BT.shape[1], device=device)[None, :] < tgt_lengths[:, None]
    _, maps = model(src_BS, tgt_BT, src_pad_mask=src_BS != pad_id, tgt_pad_mask=tgt_pad_mask_BT, return_attention=True)
    cross_BTS = maps.cross[layer].float().mean(dim=1).cpu().numpy()
    return [cross_BTS[b, : len(tgt_in[b]), : len(src[b])] for b in range(len(src))]


def align_pairs(
    model: Transformer, tokenizer, pairs: Sequence[tuple[str, str]], *, layer: int | None = None
) -> list[list[tuple[int, int]]]:
    """Hard word alignments of each (source, target) sentence pair; an empty side gives no links."""
    chosen = layer_index(model.config.n_decoder_layers, layer)
    results: list[list[tuple[int, int]]] = []
    with evaluating(model):
        for start in range(0, len(pairs), BATCH_SIZE):
            given = pairs[start : start + BATCH_SIZE]
            batch = [(normalize(s), normalize(t)) for s, t in given]
            src = [[*tokenizer.encode_source(s), tokenizer.eos_id] for s, _ in batch]
            tgt_in = [[tokenizer.bos_id, *tokenizer.encode_target(t)] for _, t in batch]
            maps = cross_attention_batch(model, src, tgt_in, layer=chosen, pad_id=tokenizer.pad_id)
            for (given_source, given_target), (source, target), cross_TS in zip(given, batch, maps, strict=True):
                if not source or not target:
                    results.append([])
                    continue
                src_origins, tgt_origins = word_origins(given_source), word_origins(given_target)
                src_words = piece_words(tokenizer.source_pieces(source))
                tgt_words = piece_words(tokenizer.target_pieces(target))
                if src_words[-1] + 1 != len(src_origins) or tgt_words[-1] + 1 != len(tgt_origins):
                    raise AlignmentError(f"pair {len(results) + 1}: subword pieces do not map onto whitespace words")
                src_words, tgt_words = [src_origins[w] for w in src_words], [tgt_origins[w] for w in tgt_words]
                # drop the source </s> column and the row that predicts the target </s>
                scores_JI = word_scores(cross_TS[:-1, :-1], src_words, tgt_words)
                with_pieces = set(tgt_words)
                results.append([(i, j) for i, j in hard_alignment(scores_JI) if j in with_pieces])
    return results


def read_lines(path: str | Path) -> list[str]:
    """The file's lines, split on "\n" only as every command reads text (str.splitlines would also split
    on U+2028 or a form feed inside a sentence and shift the pairs)."""
    path = Path(path)
    if not path.exists():  # a directory is named by corpus.read_lines; a pipe (/dev/stdin) is read
        raise AlignmentError(f"no such file: {path}")
    return corpus.read_lines(path)


def check_lengths(
    model: Transformer, tokenizer, sources: tuple[str | Path, list[str]], targets: tuple[str | Path, list[str]]
) -> None:
    """Every line fits the model's positions with its </s> (source) or <s> (target), checked before the first
    alignment is written: a long line found in a later batch stopped the job with part of the output
    written, in a message that named neither the file nor the line."""
    limit = model.config.max_positions
    sides = ((sources, tokenizer.encode_sources, "source"), (targets, tokenizer.encode_targets, "target"))
    for (path, lines), encode, side in sides:
        # a line that surely is too long is refused unencoded (a line of megabytes takes gigabytes to encode),
        # after the lines before it are measured, so the first too long is the one named
        first = next((i for i, line in enumerate(lines) if surely_too_long(tokenizer, side, line, limit - 1)), None)
        for number, ids in enumerate(encode(lines[:first]), start=1):
            if len(ids) + 1 > limit:
                raise AlignmentError(
                    f"{path} line {number} has {len(ids) + 1} tokens; the model accepts at most {limit}: shorten it"
                )
        if first is not None:
            raise AlignmentError(
                f"{path} line {first + 1} has more than {limit} tokens ({len(lines[first]):,} characters); the model "
                f"accepts at most {limit}: shorten it"
            )


def segmentation_advice(path: str | Path, lines: Sequence[str]) -> str:
    """A one-line warning when `lines` are mostly Chinese, Japanese or Thai run together without spaces
    (segmented words have 1 to 4 such letters): every sentence of it is then one word, linked as a whole."""
    unspaced, letters = unspaced_letters(lines)  # one pass over every letter of the file
    words = sum(len(line.split()) for line in lines)
    if not counts_mostly_unspaced(unspaced, letters) or unspaced <= UNSEGMENTED_LETTERS * words:
        return ""
    return (
        f"{path} is mostly Chinese, Japanese or Thai written without spaces ({unspaced / words:.0f} such letters a "
        "word), and alignment words are whitespace tokens: each of its sentences is one word, linked as a whole; "
        "to align words, split them with spaces first (e.g. jieba for Chinese, MeCab for Japanese)"
    )


def align_files(
    model: Transformer, tokenizer, src_path: str | Path, tgt_path: str | Path, *, layer: int | None = None
) -> Iterator[str]:
    """One Pharaoh line per sentence pair of the two parallel files."""
    sources, targets = read_lines(src_path), read_lines(tgt_path)
    if len(sources) != len(targets):
        raise AlignmentError(
            f"{src_path} has {len(sources)} lines but {tgt_path} has {len(targets)}; give parallel files"
        )
    check_lengths(model, tokenizer, (src_path, sources), (tgt_path, targets))
    for path, lines in ((src_path, sources), (tgt_path, targets)):
        if advice := segmentation_advice(path, lines):
            warn_caller(advice)
    for start in range(0, len(sources), BATCH_SIZE):
        chunk = list(zip(sources[start : start + BATCH_SIZE], targets[start : start + BATCH_SIZE], strict=True))
        for links in align_pairs(model, tokenizer, chunk, layer=layer):
            yield pharaoh(links)
