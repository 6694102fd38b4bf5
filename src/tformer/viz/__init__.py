"""Pictures of what a model computes: attention maps, training curves, positional encodings.

Everything draws with matplotlib's object API (`matplotlib.figure.Figure`, never pyplot), so importing
or using these modules changes no global state and needs no display.
"""
