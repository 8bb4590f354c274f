"""Finding inputs and decoding them into batches of RGB frames (decord for videos, OpenCV for still images)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

VIDEO_EXTENSIONS = frozenset(
    ".mp4 .m4v .mov .avi .mkv .webm .flv .wmv .mpg .mpeg .ts .mts .m2ts .3gp .ogv .asf .vob .divx".split()
)
IMAGE_EXTENSIONS = frozenset(".jpg .jpeg .png .bmp .tif .tiff .webp".split())


@dataclass(frozen=True)
class Source:
    """One input file and the key it is stored under."""

    path: Path  # absolute path of the file
    key: str  # path relative to the input root, with '/' (the key of the HDF5 group, before escaping)
    size_bytes: int  # file size when discovered; with mtime, tells whether a stored result is stale
    mtime: float  # modification time (seconds since the epoch)

    @property
    def is_image(self) -> bool:
        return self.path.suffix.lower() in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class VideoInfo:
    fps: float  # average frame rate of the stream (0 for a still image)
    frames_total: int  # frames in the stream according to its index
    width: int
    height: int
    frames_analysed: int  # frames that will be analysed (all, or those picked by --fps)


@dataclass(frozen=True)
class Chunk:
    """Consecutive analysed frames of one video."""

    frames: np.ndarray  # (n, H, W, 3) uint8 RGB
    frame: np.ndarray  # (n,) int32 index of each frame in the decoded stream
    time: np.ndarray  # (n,) float64 seconds


class DecodeError(RuntimeError):
    """The file cannot be opened as a video or image."""


class StreamBroken(RuntimeError):
    """The stream broke part-way: the frames before the break were decoded and yielded."""


def find_sources(inputs: list[Path] | tuple[Path, ...]) -> tuple[list[Source], list[Path]]:
    """Expand files and folders (searched recursively) into sources; also return the files of folders that were skipped.

    A file named explicitly is always tried, whatever its extension; inside folders only video and image extensions count.
    """
    sources: dict[str, Source] = {}
    ignored: list[Path] = []

    def add(path: Path, key: str) -> None:
        if key in sources and sources[key].path != path:
            raise ValueError(
                f"two inputs map to the same key '{key}': {sources[key].path} and {path}; "
                "pass their common parent folder instead so keys stay unique"
            )
        st = path.stat()
        sources[key] = Source(path=path, key=key, size_bytes=st.st_size, mtime=st.st_mtime)

    for raw in inputs:
        root = Path(raw).expanduser().absolute()
        if not root.exists():
            raise FileNotFoundError(f"input not found: {raw}")
        if root.is_file():
            add(root, root.name)
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                path = Path(dirpath) / name
                ext = path.suffix.lower()
                if name.startswith(".") or ext not in VIDEO_EXTENSIONS | IMAGE_EXTENSIONS:
                    ignored.append(path)
                    continue
                add(path, path.relative_to(root).as_posix())
    return sorted(sources.values(), key=lambda s: s.key), ignored


def sample_indices(timestamps: np.ndarray, fps: float | None) -> np.ndarray:
    """Frames to analyse: all of them, or the first frame at or after each tick of a 1/fps clock."""
    n = len(timestamps)
    if fps is None or n == 0:
        return np.arange(n)
    ticks = np.arange(0.0, timestamps[-1] + 1e-4, 1.0 / fps)  # timestamps are float32-rounded
    # A small tolerance so that a 30 fps stream sampled at 10 fps picks exactly every third frame.
    idx = np.searchsorted(timestamps, ticks - 1e-4, side="left")
    return np.unique(idx[idx < n])


def open_video(source: Source, fps: float | None, batch_size: int) -> tuple[VideoInfo, Iterator[Chunk]]:
    """Open a source and return its info and an iterator over chunks of at most `batch_size` analysed frames.

    Raises DecodeError when the file cannot be opened; the iterator raises StreamBroken after yielding every frame
    that could be decoded before a break in the stream.
    """
    if source.size_bytes == 0:
        raise DecodeError("the file is empty (0 bytes)")
    if source.is_image:
        return _open_image(source)
    decord = import_decord()
    try:
        vr = decord.VideoReader(str(source.path), ctx=decord.cpu(0), num_threads=1)
        n = len(vr)
        if n == 0:
            raise DecodeError("the video stream has no frames")
        first = vr[0].shape
        timestamps = vr.get_frame_timestamp(np.arange(n))[:, 0].astype(np.float64)
    except DecodeError:
        raise
    except Exception as e:  # decord raises RuntimeError or its own DECORDError for unreadable files
        raise DecodeError(f"cannot decode ({_first_line(e)}); is it a complete video file?") from None
    indices = sample_indices(timestamps, fps)
    info = VideoInfo(float(vr.get_avg_fps()), n, int(first[1]), int(first[0]), len(indices))
    return info, _iter_chunks(vr, indices, timestamps, batch_size)


def import_decord():
    """decord, imported after OpenCV: decord's bundled zlib, loaded first, breaks OpenCV's PNG reading and writing
    ("libpng error: bad parameters to zlib") for the rest of the process."""
    import cv2  # noqa: F401
    import decord

    return decord


def _iter_chunks(vr, indices: np.ndarray, timestamps: np.ndarray, batch_size: int) -> Iterator[Chunk]:
    vr.seek(0)
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        try:
            frames = vr.get_batch(idx.tolist()).asnumpy()
        except Exception as e:
            # Salvage the frames of this batch that precede the break, then stop: later frames are unreliable.
            good = []
            for i in idx:
                try:
                    good.append(vr[int(i)].asnumpy())
                except Exception:
                    break
            if good:
                k = len(good)
                yield Chunk(np.stack(good), idx[:k].astype(np.int32), timestamps[idx[:k]])
            if len(good) == len(idx):  # each frame decodes on its own: only the batched read failed
                vr.seek(0)
                continue
            raise StreamBroken(f"stream broke at frame {int(idx[len(good)])}: {_first_line(e)}") from None
        # decord's decoder thread keeps decoding ahead while we work on this chunk and holds every frame it decoded,
        # so memory grows with the video's length (dmlc/decord#197, #208); a seek stops it. Decoding gets about 25%
        # slower, memory stays flat.
        vr.seek(0)
        yield Chunk(frames, idx.astype(np.int32), timestamps[idx])


def _open_image(source: Source) -> tuple[VideoInfo, Iterator[Chunk]]:
    import cv2

    bgr = cv2.imread(str(source.path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DecodeError("cannot read the image (corrupt or not an image)")
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    info = VideoInfo(0.0, 1, rgb.shape[1], rgb.shape[0], 1)
    chunk = Chunk(rgb[None], np.zeros(1, np.int32), np.zeros(1, np.float64))
    return info, iter([chunk])


def _first_line(e: BaseException) -> str:
    """The message's first non-empty line: decord puts what went wrong there and a C++ stack trace after it."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    # decord prefixes messages (sometimes nested) with "[hh:mm:ss] /path/to/source.cc:line: "; keep what follows.
    return re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", text).strip()
