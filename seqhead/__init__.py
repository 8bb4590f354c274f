"""seqhead: sequence heads (masked GRU + routing, pooling heads) on affextract's cached per-frame features."""

__version__ = "0.1.0"
