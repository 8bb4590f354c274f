"""seqhead: sequence heads (masked GRU + routing, pooling heads) on affextract's cached per-frame features."""

# One distribution, one version: seqhead ships with affextract and reports its version.
from affextract.version import __version__

# Imported eagerly (functions share their submodules' names, see affextract/__init__.py); none of these modules
# loads torch at import, so `seqhead --help` and a wrong path answer before it loads.

from .evaluate import EvaluateOptions, EvaluateResult, evaluate  # noqa: E402
from .predict import PredictOptions, PredictResult, predict  # noqa: E402
from .simulate import SimulateOptions, SimulateResult, simulate  # noqa: E402
from .sweep import SweepOptions, SweepResult, Variant, sweep  # noqa: E402
from .train import TrainOptions, TrainResult, train  # noqa: E402

__all__ = [
    "__version__", "TrainOptions", "TrainResult", "train", "PredictOptions", "PredictResult", "predict",
    "EvaluateOptions", "EvaluateResult", "evaluate", "SweepOptions", "SweepResult", "Variant", "sweep",
    "SimulateOptions", "SimulateResult", "simulate",
]
