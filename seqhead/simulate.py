"""A Hume-Reaction-shaped simulated data set: an affextract format-v1 HDF5 file and a labels CSV.

Each video has a subject, a length K ≤ max_len and 7 reaction intensities in [0, 1]. The intensities drive the
26 per-frame values only during one episode (an onset–apex–offset bump) at a random position covering 10–30 % of
the video. The rest is label-free: the subject's and the video's baselines, slow drift, frame-to-frame noise, and
two half-episodes with random intensities, each moving half of the 26 values (each value's statistics look like
a labelled episode's, the co-occurrence does not). Values pass through the same non-linearities as MMA's heads
(tanh for VA, softmax for expressions, sigmoid for AUs). Some frames have no face (NaN features, face=false), in
gaps, and a few videos have no face at all.

`setting="peak"` changes how labels arise, the noise and the lengths, so that a head tuned on one setting can be
checked on another: 2–3 labelled episodes per video with intensities y·u (u in [0.3, 1], one episode at u = 1),
so the labels are the episodes' peak, not their sum; each episode moves the logits through a saturating
non-linearity (tanh) of different mixing weights; the frame noise is autocorrelated (AR(1), 0.8); videos are
shorter on average and vary more in length.

Three more settings differ in kind from these two:
- `late`: the labels are carried by an episode in the last 30 % of the video; an earlier episode of the same kind
  (all 26 values together, random intensities) carries nothing. Only *when* separates them, so a head that pools
  without order cannot tell them apart.
- `subject`: strong per-subject offsets of the features (3× the episode setting's), a per-subject bias of the
  labels, lengths from 2 s to 5 min at 4 sampled frames per second (8–1,200 frames, log-uniform), and realistic
  missing-face gaps: a per-video rate drawn from Beta(0.6, 6), gap lengths log-normal (median 8 frames, some
  over 100), 2 % of the videos without a face.
- `groups`: each target is carried by one feature group only (Adoration, Amusement: VA and expressions; Anxiety,
  Disgust: the first 8 AUs; Empathic-Pain, Fear, Surprise: the last 9 AUs), each in an episode of its own at its
  own time.
`label_noise` adds Gaussian noise of that standard deviation to the written labels (clipped to [0, 1]); the
features still follow the true intensities, so it lowers the ceiling of every head alike.

The measured movement (52 blendshapes, head pose, gaze, presence) is simulated the same way through a law of its own:
the labelled episode moves the blendshapes (sigmoid) and the head (degrees), on top of subject baselines, drift,
noise and one label-free episode; gaze follows the head with the eyes' own noise. It is drawn from random generators
of its own, so a seed gives the same 26 values with or without it. In the peak setting every labelled episode moves
them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from affextract.schema import BLENDSHAPE_NAMES
from affextract.format import MOVEMENT_OFF, Provenance, dumps
from affextract.store import FeatureWriter
from affextract.version import __version__

from .data import HUME_ID, HUME_TARGETS, DataError

HUME_SIZES = (15806, 4657, 4604)  # train, val, test videos of Hume-Reaction
HUME_SUBJECTS = 2222
SETTINGS = ("episode", "peak", "late", "subject", "groups")
# On disk, per frame and per video (26 values, face, frame, time, box, landmarks, score, chunking and attributes;
# movement adds the blendshapes, pose, gaze and presence), fitted to files this module wrote (within ±15 %).
BYTES_PER_FRAME = {False: 178, True: 409}
BYTES_PER_VIDEO = {False: 20_500, True: 32_000}
# The `groups` setting: which of the 26 values each target moves (VA + expressions, the first 8 AUs, the last 9).
TARGET_GROUPS = (slice(0, 9), slice(0, 9), slice(9, 17), slice(9, 17), slice(17, 26), slice(17, 26), slice(17, 26))


@dataclass(frozen=True)
class SimulateOptions:
    out: Path  # HDF5 file to write (format v1)
    labels: Path | None = None  # labels CSV; None = labels.csv beside `out`
    scale: float = 0.02  # fraction of Hume's 15,806 / 4,657 / 4,604 videos (0.02 ≈ 500 videos, ≈ 80 MB; 1 ≈ 4 GB)
    max_len: int = 480  # longest video, frames
    min_len: int = 32  # shortest video, frames
    no_face_rate: float = 0.06  # expected fraction of frames without a face (in gaps)
    no_face_videos: float = 0.003  # fraction of videos without any face
    signal: float = 1.0  # strength of the labelled episode (0 = labels unrelated to the features)
    nuisance: float = 0.4  # scale of the label-free slow parts: subject and video baselines, drift
    frame_noise: float = 1.2  # frame-to-frame white noise (logit units); pooled maxima pick it up, a GRU averages it
    seed: int = 0  # everything random derives from it
    movement: bool = True  # also simulate the measured movement (blendshapes, pose, gaze, presence)
    setting: str = "episode"  # how labels arise: episode | peak | late | subject | groups (module docstring)
    label_noise: float = 0.0  # standard deviation of Gaussian noise added to the written labels
    overwrite: bool = False  # replace an existing `out` or labels file (otherwise either is an error)

    def __post_init__(self):
        if self.setting not in SETTINGS:
            raise ValueError(f"setting {self.setting!r}: use one of {SETTINGS}")
        if self.scale <= 0:
            raise ValueError(f"scale {self.scale}: a positive fraction of Hume-Reaction's size")
        if self.label_noise < 0:
            raise ValueError(f"label noise {self.label_noise}: a standard deviation ≥ 0")


@dataclass(frozen=True)
class SimulatePlan:
    """What `simulate` is about to write, known before it writes anything."""

    n_videos: tuple[int, int, int]  # train, val, test
    n_frames: int
    bytes: int  # expected size of the HDF5 file (BYTES_PER_FRAME, BYTES_PER_VIDEO)


@dataclass(frozen=True)
class SimulateResult:
    h5: Path
    labels: Path
    n_videos: tuple[int, int, int]  # train, val, test
    n_frames: int


def _bump(n: int) -> np.ndarray:
    """Onset–apex–offset envelope of n frames, peak 1."""
    return np.sin(np.linspace(0, np.pi, n + 2)[1:-1]) ** 2


class _MovementLaw:
    """The measured movement of one video: blendshapes (K, 52), pose (K, 3) and gaze (K, 2) in degrees, presence
    (K,); NaN where no face."""

    def __init__(self, opts: SimulateOptions, subjects: int):
        law = np.random.default_rng(20240615)  # fixed, as the 26 values' law
        n_bs = len(BLENDSHAPE_NAMES) - 1  # `_neutral` carries no movement
        self.bs_mixing = law.normal(0, 1, (7, n_bs)).astype(np.float32) * 1.6  # intensities -> blendshape logits
        self.pose_mixing = law.normal(0, 1, (7, 3)).astype(np.float32) * 6.0  # intensities -> degrees of yaw/pitch/roll
        self.rng = np.random.default_rng([opts.seed, 1])
        self.opts = opts
        self.subj_bs = self.rng.normal(-2.0, 0.6 * opts.nuisance, (subjects, n_bs)).astype(np.float32)
        self.subj_pose = self.rng.normal(0, 6.0, (subjects, 3)).astype(np.float32)

    def __call__(self, subject: int, episodes: list, face: np.ndarray) -> dict[str, np.ndarray]:
        """`episodes`: (start, frames, intensities (7,)) of the video's labelled episodes."""
        rng, o, K = self.rng, self.opts, len(face)
        drive = np.zeros((K, 7), np.float32)  # per frame, the labelled episodes' intensities - 0.3, times their bump
        for p, E, y in episodes:
            drive[p:p + E] += o.signal * _bump(E)[:, None] * (y - 0.3)
        fake = np.zeros((K, 1), np.float32)
        E2 = max(4, int(K * rng.uniform(0.1, 0.3)))
        p2 = int(rng.integers(0, K - E2 + 1))
        fake[p2:p2 + E2, 0] = _bump(E2)
        noise = rng.uniform(0, 1, 7) - 0.3  # the label-free episode's intensities
        logits = (self.subj_bs[subject] + rng.normal(0, 0.4 * o.nuisance, self.subj_bs.shape[1])
                  + np.cumsum(rng.normal(0, 0.06 * o.nuisance, (K, self.subj_bs.shape[1])), axis=0)
                  + rng.normal(0, o.frame_noise, (K, self.subj_bs.shape[1]))
                  + drive @ self.bs_mixing + fake * (noise @ self.bs_mixing))
        neutral = rng.normal(-4.0, 0.5, (K, 1))
        blendshapes = 1 / (1 + np.exp(-np.concatenate([neutral, logits], axis=1)))
        pose = (self.subj_pose[subject] + np.cumsum(rng.normal(0, 0.5 * o.nuisance, (K, 3)), axis=0)
                + rng.normal(0, 1.0, (K, 3)) + drive @ self.pose_mixing
                + fake * (noise @ self.pose_mixing))
        gaze = 0.6 * pose[:, :2] + rng.normal(0, 3.0, (K, 2))  # the eyes follow the head, with the iris's noise
        presence = np.clip(rng.normal(0.98, 0.01, K), 0, 1)
        out = {"blendshapes": blendshapes, "pose": pose, "gaze": gaze, "presence": presence}
        for v in out.values():
            v[~face] = np.nan
        return {k: v.astype(np.float32) for k, v in out.items()}


def _gaps(rng: np.random.Generator, K: int) -> np.ndarray:
    """The `subject` setting's face track (K,) bool: a per-video loss rate, log-normal gap lengths."""
    face = np.ones(K, dtype=bool)
    if rng.random() < 0.02:
        return ~face
    rate = rng.beta(0.6, 6)  # expected fraction of frames lost: mostly small, sometimes half the video
    lengths = []
    while sum(lengths) < rate * K:
        lengths.append(int(np.ceil(rng.lognormal(np.log(8), 1.0))))
    for g in lengths:
        g0 = int(rng.integers(0, K))
        face[g0:g0 + g] = False
    return face


class _Law:
    """How reactions show in the 26 values: intensities (7,) → logits (26,), fixed whatever the seed, so simulated
    sets of different seeds agree."""

    def __init__(self):
        law = np.random.default_rng(20240614)
        self.mixing = law.normal(0, 1, (7, 26)).astype(np.float32) * 1.6  # intensities → logits of the 26 values
        self.peak = law.normal(0, 1, (7, 26)).astype(np.float32) * 1.6  # the peak setting's own mixing
        self.groups = np.zeros((7, 26), np.float32)
        for k, g in enumerate(TARGET_GROUPS):  # each target moves its own group only, as strongly in total
            width = g.stop - g.start
            self.groups[k, g] = law.normal(0, 1, width) * 1.6 * np.sqrt(26 / width) / 2


@dataclass(frozen=True)
class _Population:
    """The videos before any frame is drawn: split, subject, length and intensities of each."""

    counts: tuple[int, int, int]  # train, val, test videos
    split: np.ndarray  # (N,) Train | Val | Test
    subject: np.ndarray  # (N,) int, subjects do not cross splits
    subject_base: np.ndarray  # (subjects, 26) logit offsets of each subject
    y: np.ndarray  # (N, 7) the intensities the features follow
    y_written: np.ndarray  # (N, 7) the labels written (y plus the label noise)
    lengths: np.ndarray  # (N,) frames K of each video
    ids: list[str]

    @property
    def subjects(self) -> int:
        return len(self.subject_base)


def _population(opts: SimulateOptions, rng: np.random.Generator, extra: np.random.Generator) -> _Population:
    counts = tuple(max(2, int(round(n * opts.scale))) for n in HUME_SIZES)
    n = sum(counts)
    n_subj = max(4, int(round(HUME_SUBJECTS * n / sum(HUME_SIZES))))
    split = np.repeat(np.array(["Train", "Val", "Test"]), counts)
    # Subjects do not cross splits, as in Hume-Reaction.
    bounds = np.cumsum((0,) + counts)
    subj = np.empty(n, dtype=np.int64)
    first = 0
    for s in range(3):
        k = max(1, int(round(n_subj * counts[s] / n)))
        subj[bounds[s]:bounds[s + 1]] = first + rng.integers(0, k, counts[s])
        first += k
    subj_base = rng.normal(0, 0.6 * opts.nuisance, (first, 26)).astype(np.float32)
    subject = opts.setting == "subject"
    if subject:  # people differ: strong offsets of their features, and of how strongly they react
        subj_base *= 3
        subj_bias = extra.normal(0, 0.6, first)
    # Correlated intensities in [0, 1], many near zero as in Hume.
    corr = 0.35 * np.ones((7, 7)) + 0.65 * np.eye(7)
    z = rng.multivariate_normal(np.zeros(7), corr, n)
    y = 1 / (1 + np.exp(-(1.4 * z - 0.8 + (subj_bias[subj][:, None] if subject else 0))))
    y = np.clip(y + rng.normal(0, 0.03, y.shape), 0, 1).astype(np.float32)
    peak = opts.setting == "peak"
    lengths = np.clip(rng.normal(0.45, 0.3, n) if peak else rng.normal(0.62, 0.22, n), 0, 1) * opts.max_len
    lengths = np.clip(lengths, opts.min_len, opts.max_len).astype(int)
    if subject:  # 2 s to 5 min at 4 sampled frames per second
        lengths = np.exp(extra.uniform(np.log(8), np.log(1200), n)).astype(int)
    # The written labels: the intensities the features follow, plus the label noise (its own generator).
    y_written = np.clip(y + np.random.default_rng([opts.seed, 2]).normal(0, opts.label_noise, y.shape), 0, 1) \
        if opts.label_noise else y
    return _Population(counts, split, subj, subj_base, y, y_written, lengths, [f"{i:05d}" for i in range(n)])


def _labelled_episodes(opts: SimulateOptions, law: _Law, y: np.ndarray, logits: np.ndarray,
                       rng: np.random.Generator, extra: np.random.Generator) -> list:
    """Add the episodes that carry the labels `y` (7,) to `logits` (K, 26), in place, as the setting says; returns
    (start, frames, intensities (7,)) of each, for the movement."""
    K, signal, episodes = len(logits), opts.signal, []
    if opts.setting == "peak":
        # Labelled episodes at intensities y·u; the labels are their peak (one episode has u = 1).
        n_ep = int(rng.integers(2, 4))
        u = rng.uniform(0.3, 1.0, n_ep)
        u[rng.integers(n_ep)] = 1.0
        for k in range(n_ep):
            E = max(4, int(K * rng.uniform(0.08, 0.2)))
            p = int(rng.integers(0, K - E + 1))
            drive = 2.0 * np.tanh(0.8 * ((y * u[k] - 0.3) @ law.peak))
            logits[p:p + E] += signal * _bump(E)[:, None] * drive[None].astype(np.float32)
            episodes.append((p, E, y * u[k]))
    elif opts.setting == "groups":
        # One episode per target, each at its own time, moving its target's group only.
        for k in range(7):
            E = max(4, int(K * extra.uniform(0.08, 0.2)))
            p = int(extra.integers(0, K - E + 1))
            logits[p:p + E] += signal * _bump(E)[:, None] * ((y[k] - 0.3) * law.groups[k])[None]
            episodes.append((p, E, 0.3 + (y[k] - 0.3) * np.eye(7, dtype=np.float32)[k]))
    elif opts.setting == "late":
        # The labelled episode in the last 30 %; an earlier one of the same kind carries nothing.
        E = max(4, int(K * extra.uniform(0.1, 0.2)))
        p = int(extra.integers(int(0.7 * K), max(int(0.7 * K), K - E) + 1))
        E = min(E, K - p)
        logits[p:p + E] += signal * _bump(E)[:, None] * ((y - 0.3) @ law.mixing)[None]
        episodes.append((p, E, y))
        E3 = max(4, int(K * extra.uniform(0.1, 0.2)))
        p3 = int(extra.integers(0, max(1, int(0.5 * K) - E3 + 1)))
        E3 = min(E3, K - p3)
        decoy = (extra.uniform(0, 1, 7) - 0.3) @ law.mixing
        logits[p3:p3 + E3] += signal * _bump(E3)[:, None] * decoy[None].astype(np.float32)
    else:
        # The labelled episode: intensity-weighted directions, one bump at a random position.
        E = max(4, int(K * rng.uniform(0.1, 0.3)))
        p = int(rng.integers(0, K - E + 1))
        logits[p:p + E] += signal * _bump(E)[:, None] * ((y - 0.3) @ law.mixing)[None]
        episodes.append((p, E, y))
    return episodes


def _label_free_episodes(mixing: np.ndarray, logits: np.ndarray, rng: np.random.Generator) -> None:
    """Add, in place, the same kind of movement with random intensities, but split into two halves of the 26 values
    shown at different times, so each value's own statistics look like the labelled episode's while the
    co-occurrence (what a sequence model can see) does not."""
    K = len(logits)
    fake = (rng.uniform(0, 1, 7) - 0.3) @ mixing
    half = rng.random(26) < 0.5
    for part in (half, ~half):
        E2 = max(4, int(K * rng.uniform(0.1, 0.3)))
        p2 = int(rng.integers(0, K - E2 + 1))
        logits[p2:p2 + E2] += _bump(E2)[:, None] * np.where(part, fake, 0).astype(np.float32)[None]


def _values(logits: np.ndarray) -> np.ndarray:
    """The 26 values (K, 26) from their logits, through MMA's non-linearities: tanh (VA), softmax, sigmoid (AUs)."""
    feats = np.empty((len(logits), 26), dtype=np.float32)
    feats[:, :2] = np.tanh(0.5 * logits[:, :2])
    e = np.exp(logits[:, 2:9] - logits[:, 2:9].max(axis=1, keepdims=True))
    feats[:, 2:9] = e / e.sum(axis=1, keepdims=True)
    feats[:, 9:] = 1 / (1 + np.exp(-logits[:, 9:]))
    return feats


def _face_track(opts: SimulateOptions, K: int, rng: np.random.Generator, extra: np.random.Generator) -> np.ndarray:
    """(K,) bool, True where a face was found: short gaps, a few videos without any face (`subject`: `_gaps`)."""
    face = np.ones(K, dtype=bool)
    if opts.setting == "subject":
        face = _gaps(extra, K)
    elif rng.random() < opts.no_face_videos:
        face[:] = False
    else:
        n_gaps = rng.poisson(opts.no_face_rate * K / 12)
        for _ in range(n_gaps):
            g0 = int(rng.integers(0, K))
            face[g0:g0 + int(rng.integers(3, 22))] = False
    return face


def _video(opts: SimulateOptions, law: _Law, pop: _Population, i: int, lfilter, rng: np.random.Generator,
           extra: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list]:
    """Video i's 26 values (K, 26; NaN where no face), its face track (K,) and its labelled episodes."""
    K = int(pop.lengths[i])
    peak = opts.setting == "peak"
    logits = pop.subject_base[pop.subject[i]] + rng.normal(0, 0.4 * opts.nuisance, 26).astype(np.float32)  # (26,)
    drift = np.cumsum(rng.normal(0, 0.06 * opts.nuisance, (K, 26)), axis=0).astype(np.float32)  # (K, 26)
    noise = rng.normal(0, opts.frame_noise, (K, 26))
    if peak:  # AR(1) noise with the same variance: slow wobbles that look like small episodes
        noise = lfilter([np.sqrt(1 - 0.8 ** 2)], [1, -0.8], noise, axis=0)
    logits = logits[None] + drift + noise.astype(np.float32)
    episodes = _labelled_episodes(opts, law, pop.y[i], logits, rng, extra)
    _label_free_episodes(law.peak if peak else law.mixing, logits, rng)
    feats = _values(logits)
    face = _face_track(opts, K, rng, extra)
    feats[~face] = np.nan
    return feats, face, episodes


def _refuse_existing(out: Path, labels: Path, overwrite: bool) -> None:
    """Nothing already on disk is replaced without `overwrite` (a second file in one folder would silently take
    the first one's labels.csv)."""
    there = [str(p) for p in (out, labels) if p.exists()]
    if there and not overwrite:
        one = len(there) == 1
        raise DataError(f"{' and '.join(there)} already exist{'s' if one else ''}: pass --overwrite to replace "
                        f"{'it' if one else 'them'}, or write elsewhere (another OUT, or --labels)")


def simulate(opts: SimulateOptions, plan: Callable[[SimulatePlan], None] | None = None) -> SimulateResult:
    """Write the simulated features file and labels; `plan` is called once, with the sizes, before anything is
    written. An existing file (features or labels) is refused unless `opts.overwrite`."""
    out = Path(opts.out)
    labels_path = Path(opts.labels) if opts.labels else out.with_name("labels.csv")
    _refuse_existing(out, labels_path, opts.overwrite)
    from scipy.signal import lfilter  # only for the peak setting; scipy.signal takes a second to import

    rng = np.random.default_rng(opts.seed)
    extra = np.random.default_rng([opts.seed, 3])  # the newer settings' own draws, so older ones stay as they were
    law = _Law()
    pop = _population(opts, rng, extra)
    if plan is not None:
        size = int(pop.lengths.sum()) * BYTES_PER_FRAME[opts.movement] + len(pop.ids) * BYTES_PER_VIDEO[opts.movement]
        plan(SimulatePlan(pop.counts, int(pop.lengths.sum()), size))

    out.parent.mkdir(parents=True, exist_ok=True)
    labels_path.parent.mkdir(parents=True, exist_ok=True)
    provenance = Provenance(model="simulated", model_sha256="", alignment="arcface-112", sampling=dumps({"fps": None}),
                            detector=dumps({"name": "simulated", "setting": opts.setting}),
                            movement=dumps({"enabled": True, "simulated": True}) if opts.movement else MOVEMENT_OFF)
    written_by = {"affextract_version": f"seqhead-simulate {__version__}"}
    movement = _MovementLaw(opts, pop.subjects) if opts.movement else None
    datasets = ("blendshapes", "pose", "gaze", "presence") if opts.movement else ()
    with FeatureWriter(out, provenance, written_by, overwrite=True, datasets=datasets) as h5:
        for i in range(len(pop.ids)):
            feats, face, episodes = _video(opts, law, pop, i, lfilter, rng, extra)
            K = len(feats)
            source = f"{pop.split[i]}/{pop.ids[i]}.mp4"
            box = np.tile(np.array([200, 80, 330, 250], dtype=np.float32), (K, 1))
            box += rng.normal(0, 2, (K, 4)).astype(np.float32)
            box[~face] = np.nan
            lm = np.array([[240, 140], [290, 140], [265, 170], [245, 200], [285, 200]], dtype=np.float32)
            lm = np.repeat(lm[None], K, axis=0) + box[:, None, :2] - np.float32([200, 80])
            video = h5.video(source, dict(source=source, size_bytes=K * 900, mtime=0.0, fps=30.0, frames_total=K,
                                          width=640, height=360), frames=K)
            video.append(feats, face, np.arange(K, dtype=np.int32), np.arange(K, dtype=np.float64) / 30.0, box, lm,
                         np.where(face, 0.99, np.nan).astype(np.float32),
                         **(movement(pop.subject[i], episodes, face) if movement else {}))
            video.finish()
    df = pd.DataFrame(pop.y_written, columns=list(HUME_TARGETS)).round(4)
    df.insert(0, HUME_ID, pop.ids)
    df["Split"] = pop.split
    df["Subject_ID"] = [f"S{s:04d}" for s in pop.subject]
    df.to_csv(labels_path, index=False)
    return SimulateResult(out, labels_path, pop.counts, int(pop.lengths.sum()))
