"""Names and orders shared by the model, the HDF5 format and seqhead (see README, "HDF5 format")."""

import numpy as np

FORMAT = "affextract-features"
FORMAT_VERSION = 1

# Aff-Wild2 / ABAW order.
EXPRESSIONS = ("neutral", "anger", "disgust", "fear", "happiness", "sadness", "surprise")
# Union of the AUs annotated in Aff-Wild2 and EmotioNet, plus AU11 (paper Table 1).
AUS = (1, 2, 4, 5, 6, 7, 9, 10, 11, 12, 15, 17, 20, 23, 24, 25, 26)
AU_NAMES = tuple(f"AU{a}" for a in AUS)
FEATURE_NAMES = ("valence", "arousal") + EXPRESSIONS + AU_NAMES  # 26 values per frame

VA = slice(0, 2)
EXPR = slice(2, 9)
AU = slice(9, 26)
GROUPS = {"va": VA, "expr": EXPR, "au": AU}

# Expression -> AU prior of the paper's Table 1 (Du et al. 2014): prototypical and observational AUs.
_PRIOR_AUS = {
    "happiness": (6, 12, 25),
    "sadness": (1, 4, 6, 11, 15, 17),
    "fear": (1, 2, 4, 5, 20, 25, 26),
    "anger": (4, 7, 10, 17, 23, 24),
    "surprise": (1, 2, 5, 25, 26),
    "disgust": (4, 9, 10, 17, 24),
}
# (7, 17): r_{AU|expr}; the neutral row is all zero.
AU_PRIOR = np.array(
    [[1.0 if au in _PRIOR_AUS.get(e, ()) else 0.0 for au in AUS] for e in EXPRESSIONS], dtype=np.float32
)
