"""Training the MMA: `train` (the loop), `losses` (Eq. 3), `augment`, `validate` (per-epoch metrics) and `calibrate`
(inference-time settings chosen on validation data).

Import from the modules (`from affextract.training.train import TrainOptions, train`); this package re-exports
nothing, so `affextract.training.train` always names the module.
"""
