"""The training names at their earlier path, kept only for the shipped weights' record: its `reproduce_calibration`
(affextract/weights/mma_ferplus_small.json, whose SHA-256 is pinned, so it is not edited) names
`affextract.train.calibrate_weights`. The code lives in affextract.training; import from there."""

from affextract.training.augment import AUGMENT_PRESETS, Augment, augment_batch
from affextract.training.calibrate import CalibrateOptions, calibrate, calibrate_weights
from affextract.training.losses import DM_FORMS, ccc_loss, dm_loss, mma_losses
from affextract.training.train import HEADS, TrainOptions, TrainResult, expression_prior, train
from affextract.training.validate import SELECT_METRICS

__all__ = ["AUGMENT_PRESETS", "Augment", "augment_batch", "CalibrateOptions", "calibrate", "calibrate_weights",
           "DM_FORMS", "ccc_loss", "dm_loss", "mma_losses", "HEADS", "TrainOptions", "TrainResult", "expression_prior",
           "train", "SELECT_METRICS"]
