"""affextract: per-frame facial-affect features (valence/arousal, 7 expressions, 17 AUs) from video."""

__version__ = "0.1.0"
