"""affextract: per-frame facial-affect features (valence/arousal, 7 expressions, 17 AUs) from video.

    import affextract
    report = affextract.extract(["videos/"], "out.h5")      # what `affextract run videos/ out.h5` does
    with affextract.open_features("out.h5") as ff:
        df = ff.dataframe()                                  # video, frame, time, face + the 26 features
"""

# First: store.py reads the version from the package while the imports below are still running.
from affextract.version import __version__

# Imported eagerly (as whisper does): `extract` and `export` are both functions and submodules, and a lazy attribute
# would be rebound to the submodule as soon as anything imported it.
from affextract.export import ExportOptions, export
from affextract.extract import ExtractOptions, ExtractReport, extract
from affextract.features import FeatureFile, VideoFeatures, open_features
from affextract.plot import PlotOptions, plot_timeline
from affextract.schema import FEATURE_NAMES

__all__ = ["__version__", "extract", "ExtractOptions", "ExtractReport", "open_features", "FeatureFile",
           "VideoFeatures", "plot_timeline", "PlotOptions", "export", "ExportOptions", "FEATURE_NAMES"]
