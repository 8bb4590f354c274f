"""The training names at their earlier path: the command line and the shipped weights' record
(`reproduce_calibration`) import them from here. They live in affextract.training."""

from affextract.training.augment import AUGMENT_PRESETS, Augment, augment_batch
from affextract.training.calibrate import CalibrateOptions, calibrate, calibrate_weights
from affextract.training.losses import DM_FORMS, ccc_loss, dm_loss, mma_losses
from affextract.training.train import HEADS, TrainOptions, TrainResult, expression_prior, train
from affextract.training.validate import SELECT_METRICS

__all__ = ["AUGMENT_PRESETS", "Augment", "augment_batch", "CalibrateOptions", "calibrate", "calibrate_weights",
           "DM_FORMS", "ccc_loss", "dm_loss", "mma_losses", "HEADS", "TrainOptions", "TrainResult", "expression_prior",
           "train", "SELECT_METRICS"]
