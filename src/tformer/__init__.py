"""tformer: the Transformer of "Attention Is All You Need", from first principles."""

__version__ = "0.1.0"
