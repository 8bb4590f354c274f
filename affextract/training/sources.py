"""Training from named datasets: what `affextract train` does, as one call. The datasets are named as on the command
line ("kind:path[:arg]", datasets.load_spec); teacher AUs come from a FER+ blendshape cache (teacher.load_cached);
what was read is recorded with the weights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from affextract.training.teacher import TeacherOptions
from affextract.training.train import TrainOptions, TrainResult, train


@dataclass(frozen=True)
class TeacherCache:
    """Teacher AUs for every FER+ set of a run, from a blendshape cache."""

    path: Path  # .npz written by tools/ferplus_teacher.py, one row per row of the ferplus.h5
    options: TeacherOptions = field(default_factory=TeacherOptions)  # how coefficients become probabilities
    min_presence: float = 0.5  # faces whose mesh presence is below this get no teacher (L_DM covers them)


@dataclass(frozen=True)
class Sources:
    """The datasets a training run reads."""

    data: tuple[str, ...]  # training datasets "kind:path[:arg]" (datasets.load_spec); several are mixed
    val: tuple[str, ...] = ()  # validation datasets that pick the best epoch, same form
    derive_va: bool = False  # fill missing valence/arousal from the expression labels (datasets.derive_va)
    teacher: TeacherCache | None = None  # None: the AU head learns from L_DM (and AU labels) alone


def load_sources(sources: Sources) -> tuple[list, list, dict]:
    """The training and validation FaceSets of `sources`, and the facts about them recorded with the weights.
    Raises DatasetError (or FileNotFoundError/ValueError) naming the dataset or cache that cannot be read."""
    from affextract.training.datasets import load_spec

    train_sets = [load_spec(s, sources.derive_va) for s in sources.data]
    val_sets = [load_spec(s, sources.derive_va) for s in sources.val]
    meta: dict = {"derived_va": sources.derive_va}
    t = sources.teacher
    if t is not None:
        from affextract.training.teacher import load_cached

        train_sets = [load_cached(s, t.path, t.options, t.min_presence) for s in train_sets]
        val_sets = [load_cached(s, t.path, t.options, t.min_presence) for s in val_sets]
        meta["teacher"] = {"cache": str(t.path), "options": asdict(t.options), "min_presence": t.min_presence}
    return train_sets, val_sets, meta


def train_from_sources(sources: Sources, opts: TrainOptions,
                       on_event: Callable[[dict], None] | None = None) -> TrainResult:
    """Load `sources` (load_sources) and train on them (training.train.train, which says what `on_event` gets);
    the facts about the data join `opts.metadata` in the weights' record."""
    train_sets, val_sets, meta = load_sources(sources)
    return train(train_sets, val_sets, replace(opts, metadata={**opts.metadata, **meta}), on_event)
