"""How a tformer tokenizer lays out its ids: here, beside `ModelConfig.pad_id`, so that `DataConfig`
checks a vocabulary size before any text is read, and `tformer.data.tokenizer` trains by the same
numbers."""

SPECIAL_PIECES = 4  # pad 0, bos 1, eos 2, unk 3 (docs/CONVENTIONS.md)
BYTE_PIECES = 256  # with byte_fallback, ids 4 to 259: one per byte value, used or not


def smallest_vocab_size(*, byte_fallback: bool) -> int:
    """The special pieces, the byte pieces with byte_fallback, and the one learned piece sentencepiece
    needs at least: below this it cannot train."""
    return SPECIAL_PIECES + (BYTE_PIECES if byte_fallback else 0) + 1
