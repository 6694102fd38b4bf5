"""The three kinds of attention a Transformer computes, by the names `AttentionMaps` gives them.

Apart from the drawing code (numpy, torch, matplotlib) so that `tformer attention --help` lists them
without importing any of it."""

KINDS = ("encoder_self", "decoder_self", "cross")
# whose layers each kind is: a model's encoder and decoder may have different numbers of them
STACKS = {"encoder_self": "encoder", "decoder_self": "decoder", "cross": "decoder"}
