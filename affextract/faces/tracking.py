"""Tracking: the one subject of a video (its primary face), followed frame after frame.

``PrimaryFaceTracker`` decides which detected face is the subject; ``PrimaryFaceStream`` runs a detector over a video
batch by batch, with full detections on key frames spaced in time and a cheap re-fit of the tracked face in between.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from affextract.faces.detectors import Detector, Faces, check_frames


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(P, 4), (Q, 4) x1, y1, x2, y2 -> (P, Q) intersection over union."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


@dataclass(frozen=True)
class TrackerOptions:
    # A detection continues the track when its IoU with the last tracked box is at least this.
    iou_threshold: float = 0.3
    # Seconds of video without the tracked face after which the largest face is taken again.
    max_lost: float = 1.0


class PrimaryFaceTracker:
    """Picks the one subject of a video, frame after frame.

    Rule: the first face is the largest; afterwards the face overlapping the last tracked box best (IoU >=
    ``iou_threshold``) is followed, so a larger bystander entering the frame is ignored. The tracked box moves with
    every frame where the subject was seen (``follow``), so the overlap is measured against where the face was a
    moment ago. When no face overlaps, the frame has no primary face; once the subject has not been seen for
    ``max_lost`` seconds the largest face is acquired again.
    """

    def __init__(self, iou_threshold: float = TrackerOptions.iou_threshold, max_lost: float = TrackerOptions.max_lost):
        self.options = TrackerOptions(iou_threshold=iou_threshold, max_lost=max_lost)
        self.box: np.ndarray | None = None  # (4,) last tracked box
        self.seen: float = 0.0  # time (s) the subject was last seen

    def reset(self) -> None:
        self.box = None

    def follow(self, box: np.ndarray, time: float) -> None:
        """The subject was found at `box` at `time` (by a detection or a re-fit)."""
        self.box = np.asarray(box, np.float32).copy()
        self.seen = float(time)

    def update(self, faces: Faces, time: float) -> int | None:
        """Index of the primary face among the detections `faces` of the frame at `time` (s), or None if it has none."""
        finite = np.isfinite(faces.boxes).all(1) if len(faces) else np.zeros(0, bool)
        if not finite.any():
            return None
        if self.box is None or time - self.seen >= self.options.max_lost:
            index = int(np.argmax(np.where(finite, faces.areas, -np.inf)))
        else:
            iou = np.where(finite, box_iou(self.box, faces.boxes)[0], -1.0)
            index = int(np.argmax(iou))
            if iou[index] < self.options.iou_threshold:
                return None
        self.follow(faces.boxes[index], time)
        return index


@dataclass(frozen=True)
class PrimaryFaces:
    """The primary face of each frame of a batch (NaN rows and face=False where there is none)."""

    face: np.ndarray  # (N,) bool
    boxes: np.ndarray  # (N, 4) float32 x1, y1, x2, y2
    scores: np.ndarray  # (N,) float32
    landmarks: np.ndarray  # (N, 5, 2) float32
    detected: np.ndarray  # (N,) bool: True where a full detection ran, False where the box was only re-fitted


@dataclass(frozen=True)
class StreamOptions:
    # Seconds of video between full detections (key frames); the frames in between only re-fit the tracked face with
    # the detector's refine() (MTCNN: one O-Net pass, ~20x cheaper than a full detection). Spaced in time, not in
    # analysed frames, so sampling with --fps does not stretch the gaps. 0 = a full detection on every frame.
    detect_interval: float = 0.0
    # A re-fitted face scoring lower is lost: that frame gets a full detection at once.
    min_refine_score: float = 0.8


class PrimaryFaceStream:
    """Primary face of every frame of one video, fed in order, batch after batch, with each frame's time.

    Key frames (the first frame at or after every ``detect_interval`` seconds) get a full detection, all of a batch in
    one call, and go through ``PrimaryFaceTracker``. The frames between two key frames re-fit the box of the latest
    detection (one batched ``refine`` call), so the result is the same however the video is cut into batches. A frame
    whose re-fit fails gets a full detection at once, so a face that moved or turned is found again there, not at the
    next key frame. While the subject stays unseen (a detection missed it, on a key frame or not), every following
    frame is tried the same way, a re-fit where it was last seen and then a full detection, for up to the tracker's
    ``max_lost`` seconds; after that, faces are looked for on key frames only, so a video without faces costs one
    detection per key frame. Detectors without ``refine`` are run on every frame.
    """

    def __init__(self, detector: Detector, detect_interval: float = 0.0, min_refine_score: float = 0.8,
                 tracker: PrimaryFaceTracker | None = None):
        if detect_interval < 0:
            raise ValueError(f"detect_interval must be >= 0 seconds, got {detect_interval}")
        self.detector = detector
        refines = hasattr(detector, "refine")
        self.options = StreamOptions(detect_interval if refines else 0.0, min_refine_score)
        self.tracker = tracker if tracker is not None else PrimaryFaceTracker()
        # The subject's box at its latest full detection that found it, which the frames after it re-fit (not the
        # previous frame's re-fitted box: so the result does not depend on where batches start); None once the subject
        # has been unseen for the tracker's max_lost.
        self._box: np.ndarray | None = None
        self._next_key: float | None = None  # time (s) of the next scheduled key frame
        self._last_key = -np.inf

    def __call__(self, frames: np.ndarray, times: np.ndarray) -> PrimaryFaces:
        """Frames (N, H, W, 3) uint8 RGB and their times (N,) in seconds, continuing the previous call's video."""
        frames = check_frames(frames)
        times = np.asarray(times, np.float64).reshape(-1)
        n = len(frames)
        if len(times) != n:
            raise ValueError(f"one time per frame: {n} frames, {len(times)} times")
        out = PrimaryFaces(np.zeros(n, bool), np.full((n, 4), np.nan, np.float32), np.zeros(n, np.float32),
                           np.full((n, 5, 2), np.nan, np.float32), self._schedule(times))
        keys = np.flatnonzero(out.detected)
        found = dict(zip(keys.tolist(), self.detector.detect(frames[keys]) if len(keys) else []))
        i = 0
        while i < n:
            if i in found:
                if not self._take(out, i, found[i], times[i]) and self._box is not None:
                    self._refit(frames, times, out, i, i + 1)  # the detection missed the subject: look where it was
                i += 1
                continue
            end = i + 1
            while end < n and end not in found:
                end += 1
            self._refit(frames, times, out, i, end)
            i = end
        return out

    def _schedule(self, times: np.ndarray) -> np.ndarray:
        """(N,) bool: the key frames among frames at `times`."""
        if self.options.detect_interval <= 0:
            return np.ones(len(times), bool)
        keys = np.zeros(len(times), bool)
        for k, t in enumerate(times):
            # 1e-4 s: timestamps are float32-rounded, so 10 frames of 25 fps are 0.4 s give or take a rounding.
            if self._next_key is None or t >= self._next_key - 1e-4 or t < self._last_key:
                keys[k] = True
                self._next_key, self._last_key = t + self.options.detect_interval, t
        return keys

    def _take(self, out: PrimaryFaces, i: int, faces: Faces, time: float) -> bool:
        """Frame i had a full detection: the tracker picks the subject among `faces`. Returns whether it did."""
        index = self.tracker.update(faces, time)
        if index is None:
            if time - self.tracker.seen >= self.tracker.options.max_lost:
                self._box = None
            return False
        out.face[i] = True
        out.boxes[i], out.scores[i], out.landmarks[i] = faces.boxes[index], faces.scores[index], faces.landmarks[index]
        self._box = faces.boxes[index].astype(np.float32)
        return True

    def _refit(self, frames: np.ndarray, times: np.ndarray, out: PrimaryFaces, start: int, end: int) -> None:
        """Frames start..end-1 follow the subject by re-fitting its box; a frame that loses it gets a full detection
        unless it had one already."""
        while start < end and self._box is not None:
            refined = self.detector.refine(frames[start:end], np.repeat(self._box[None], end - start, axis=0))
            ok = refined.scores >= self.options.min_refine_score
            kept = end - start if ok.all() else int(np.argmin(ok))  # frames before the first one that lost the face
            rows = slice(start, start + kept)
            out.face[rows] = True
            out.boxes[rows], out.scores[rows] = refined.boxes[:kept], refined.scores[:kept]
            out.landmarks[rows] = refined.landmarks[:kept]
            if kept:
                self.tracker.follow(refined.boxes[kept - 1], times[start + kept - 1])
            start += kept
            if start < end:  # the track is lost on this frame: detect it again at once
                if not out.detected[start]:
                    out.detected[start] = True
                    self._take(out, start, self.detector.detect(frames[start:start + 1])[0], times[start])
                start += 1
