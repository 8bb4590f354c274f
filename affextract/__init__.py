"""affextract: per-frame facial-affect features (valence/arousal, 7 expressions, 17 AUs) from video.

    import affextract
    report = affextract.extract(["videos/"], "out.h5")      # what `affextract run videos/ out.h5` does
    with affextract.open_features("out.h5") as ff:
        df = ff.dataframe()                                  # video, frame, time, face + the 26 features

The names below are imported on first use, so `import affextract` stays light (no torch until extraction).
"""

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "extract": "affextract.extract",
    "ExtractOptions": "affextract.extract",
    "ExtractReport": "affextract.extract",
    "open_features": "affextract.features",
    "FeatureFile": "affextract.features",
    "VideoFeatures": "affextract.features",
    "plot_timeline": "affextract.plot",
    "PlotOptions": "affextract.plot",
    "export": "affextract.export",
    "ExportOptions": "affextract.export",
    "FEATURE_NAMES": "affextract.schema",
}

__all__ = ["__version__", *_LAZY]

import sys as _sys
import types as _types


class _CallableModule(_types.ModuleType):
    """A submodule named like its main function: calling the module calls that function."""

    def __call__(self, *args, **kwargs):
        return getattr(self, self.__name__.rsplit(".", 1)[1])(*args, **kwargs)


class _Package(_types.ModuleType):
    # `affextract.extract` and `affextract.export` are both functions of the API and submodules. Importing a
    # submodule (`from affextract.extract import ExtractOptions`) rebinds the package attribute to the module, so
    # `affextract.extract(...)` would then fail; such a module is made callable instead, and module attributes
    # (`affextract.extract.ExtractOptions`) keep working.
    def __getattribute__(self, name):
        value = super().__getattribute__(name)
        if name in ("extract", "export") and type(value) is _types.ModuleType:
            value.__class__ = _CallableModule
        return value


_sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'affextract' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
