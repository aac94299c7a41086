"""Numbers of the algorithm that the configuration needs too (``config.py`` imports this
module, not the torch ones, so that loading a config loads no torch)."""

#: recent queries per layer that decide an event's representatives
OBSERVATION_QUERIES = 32
#: how far (in tokens) queries may drift past the bounded anchor before it moves
REANCHOR = 128
#: the rotation code of keys at their true positions (the exact frame); no anchor has it
NATURAL = -(1 << 63)
