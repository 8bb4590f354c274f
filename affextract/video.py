"""Finding inputs and decoding them into batches of RGB frames (decord for videos, PyAV for the videos decord cannot
read to their end, OpenCV for still images)."""

from __future__ import annotations

import errno
import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

VIDEO_EXTENSIONS = frozenset(
    ".mp4 .m4v .mov .avi .mkv .webm .flv .wmv .mpg .mpeg .ts .mts .m2ts .3gp .ogv .asf .vob .divx".split()
)
# Still images: every file type OpenCV's imread decodes in every build (the one image reader of `run`, `plot` and the
# labelled image folders of `affextract.training.datasets`); .pgm/.ppm are the Netpbm files some face datasets ship.
IMAGE_EXTENSIONS = frozenset(".jpg .jpeg .png .bmp .tif .tiff .webp .pgm .ppm".split())
# Inputs that list videos rather than hold one: a text file, one path a line, or a CSV file with a `path` column.
MANIFEST_EXTENSIONS = frozenset({".txt", ".csv"})


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
    frames_analysed: int  # frames that will be analysed (all, or those picked by --fps); fewer if the stream breaks
    decoder: str = "decord"  # what decodes the frames: decord, pyav (sequential, one thread) or opencv (an image)


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


DAMAGED = "the file looks truncated or damaged: re-download it, or re-encode it, to analyse the rest"


def find_sources(inputs: list[Path] | tuple[Path, ...]) -> tuple[list[Source], list[Path]]:
    """Expand files, folders (searched recursively) and manifests (MANIFEST_EXTENSIONS) into sources; also return the
    files of folders that were skipped.

    A file named explicitly is always tried, whatever its extension; inside folders only video and image extensions
    count. A manifest's relative paths are read from its folder and keep that relative path as their key, so a
    manifest inside a folder names its videos as a run on the folder does.
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
        if root.is_file() and root.suffix.lower() in MANIFEST_EXTENSIONS:
            for where, path in _manifest_paths(root):
                if not path.is_file():
                    raise FileNotFoundError(f"{where}: no such file {path} (relative paths are read from the "
                                            "manifest's folder): fix or remove that line")
                add(path, _manifest_key(root.parent, path))
            continue
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


def _manifest_paths(manifest: Path) -> Iterator[tuple[str, Path]]:
    """("list.txt line N", absolute path) of each video a manifest names; blank lines and '#' comments are skipped."""
    import csv

    with open(manifest, newline="") as f:
        if manifest.suffix.lower() == ".csv":
            rows = csv.DictReader(f)
            if "path" not in (rows.fieldnames or ()):
                raise ValueError(f"{manifest}: a CSV manifest names its videos in a `path` column; its columns are "
                                 f"{', '.join(rows.fieldnames or ()) or 'none'}")
            entries = ((rows.line_num, row["path"] or "") for row in rows)
        else:
            entries = enumerate((line.rstrip("\r\n") for line in f), start=1)
        for n, text in entries:
            text = text.strip()
            if text and not text.startswith("#"):
                yield f"{manifest} line {n}", Path(os.path.normpath(manifest.parent / Path(text).expanduser()))


def _manifest_key(folder: Path, path: Path) -> str:
    """The key of a manifest's entry: its path relative to the manifest's folder (absolute when outside it)."""
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return path.as_posix().lstrip("/")


class FrameSampler:
    """Picks the frames to analyse as they come, in presentation order: all of them, or the first frame at or after
    each tick of a 1/fps clock (a frame covers every tick up to its timestamp)."""

    def __init__(self, fps: float | None):
        self.fps = fps
        self.tick = 0  # the first tick no frame has covered yet

    def __call__(self, t: float) -> bool:
        if self.fps is None:
            return True
        limit = t + 1e-4  # decord's timestamps are float32-rounded: a frame on a tick may come out just before it
        if self.tick / self.fps > limit:
            return False
        self.tick = max(self.tick, int(limit * self.fps))
        while self.tick / self.fps <= limit:
            self.tick += 1
        return True


def sample_indices(timestamps: np.ndarray, fps: float | None) -> np.ndarray:
    """Frames to analyse, given every frame's timestamp (FrameSampler's rule)."""
    take = FrameSampler(fps)
    return np.array([i for i, t in enumerate(timestamps.tolist()) if take(t)], dtype=np.int64)


def read_video(source: Source, fps: float | None, batch_size: int) -> Iterator[VideoInfo | Chunk]:
    """A source's frames, the same on every run: a VideoInfo, then chunks of at most `batch_size` analysed frames.

    decord decodes (fast, and it seeks when --fps skips frames), but its decoder thread reads ahead, so where it
    reports a damaged file's break depends on thread timing. So a video decord cannot open, or that breaks part-way,
    is decoded again wholly by PyAV, sequentially on one thread, which stops at the first bad packet whatever the
    load: a second VideoInfo announces this restart, and the chunks before it are void. Raises DecodeError when no
    frame can be decoded; the iterator raises StreamBroken after the last frame decoded before a break.
    """
    try:
        info, chunks = open_video(source, fps, batch_size)
    except DecodeError:
        if source.size_bytes == 0 or source.is_image:
            raise
    else:
        yield info
        try:
            yield from chunks
            return
        except StreamBroken:
            pass
    info, chunks = open_video(source, fps, batch_size, decoder="pyav")
    yield info
    yield from chunks


def open_video(source: Source, fps: float | None, batch_size: int,
               decoder: str = "decord") -> tuple[VideoInfo, Iterator[Chunk]]:
    """Open a source with `decoder` (decord or pyav; OpenCV for images) and return its info and an iterator over
    chunks of at most `batch_size` analysed frames.

    Raises DecodeError when the file cannot be opened or its first frame not decoded; the iterator raises
    StreamBroken after yielding every frame that could be decoded before a break in the stream (with decord, where
    it reports the break varies from run to run: read_video handles that).
    """
    if source.size_bytes == 0:
        raise DecodeError("the file is empty (0 bytes)")
    if source.is_image:
        return _open_image(source)
    if decoder == "pyav":
        return _open_pyav(source, fps, batch_size)
    if decoder != "decord":
        raise ValueError(f"unknown decoder {decoder!r}: decord or pyav")
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
    listed = _listed_frames(source.path)
    if listed > n:  # decord counts the frames it finds: a file cut between two frames looks complete to it
        raise DecodeError(f"the file holds {n} of the {listed} frames its index lists; {DAMAGED}")
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
            # The break surfaces wherever decord's reading-ahead thread happens to be: not a place to cut the video.
            raise StreamBroken(f"stream broke at or after frame {int(idx[0])}: {_first_line(e)}") from None
        # decord's decoder thread keeps decoding ahead while we work on this chunk and holds every frame it decoded,
        # so memory grows with the video's length (dmlc/decord#197, #208); a seek stops it. Decoding gets about 25%
        # slower, memory stays flat.
        vr.seek(0)
        yield Chunk(frames, idx.astype(np.int32), timestamps[idx])


def _open_pyav(source: Source, fps: float | None, batch_size: int) -> tuple[VideoInfo, Iterator[Chunk]]:
    import av

    try:
        container = av.open(str(source.path))
    except av.error.FFmpegError as e:
        raise DecodeError(f"cannot decode ({ffmpeg_error(e)}); is it a complete video file?") from None
    if not container.streams.video:
        container.close()
        raise DecodeError("the file has no video stream")
    stream = container.streams.video[0]
    # One thread, no frame threading: the stream is decoded packet after packet, so a damaged file breaks at the same
    # frame on every run.
    stream.thread_type = "NONE"
    stream.codec_context.thread_count = 1
    frames = _pyav_frames(container, stream)
    try:
        first = next(frames)
    except StopIteration:
        raise DecodeError("the video stream has no frames") from None
    except StreamBroken as e:
        raise DecodeError(f"cannot decode the first frame ({str(e).split(': ', 1)[1]})") from None
    rate = float(stream.average_rate or 0)
    # From the container's index, or its duration: a damaged file brings fewer.
    n = stream.frames or (int(round(float(stream.duration * stream.time_base) * rate)) if stream.duration else 0)
    analysed = len(sample_indices(np.arange(n) / rate, fps)) if rate else n
    info = VideoInfo(rate, n, first.width, first.height, analysed, decoder="pyav")
    return info, _pyav_chunks(itertools.chain([first], frames), rate, fps, batch_size)


def _listed_frames(path: Path) -> int:
    """Frames the container's index lists (MP4/MOV, AVI), read from its header; 0 when it has none."""
    import av

    try:
        with av.open(str(path)) as container:
            return container.streams.video[0].frames if container.streams.video else 0
    except av.error.FFmpegError:
        return 0


def _pyav_frames(container, stream) -> Iterator:
    """Decoded frames in presentation order, up to the end or the first error (then StreamBroken). A stream that
    ends before the last frame its index lists was cut off: StreamBroken too."""
    import av

    k = packets = 0
    try:
        for packet in container.demux(stream):
            packets += packet.size > 0
            for frame in packet.decode():
                yield frame
                k += 1
    except av.error.FFmpegError as e:
        raise StreamBroken(f"stream broke at frame {k}: {ffmpeg_error(e)}; {DAMAGED}") from None
    finally:
        container.close()
    if packets < stream.frames:
        raise StreamBroken(f"stream broke at frame {k}: the file ends after {packets} of the {stream.frames} frames "
                           f"its index lists; {DAMAGED}")


def _pyav_chunks(frames: Iterator, rate: float, fps: float | None, batch_size: int) -> Iterator[Chunk]:
    take = FrameSampler(fps)
    rgb, index, time = [], [], []

    def chunk() -> Chunk:
        out = Chunk(np.stack(rgb), np.array(index, np.int32), np.array(time, np.float64))
        rgb.clear(), index.clear(), time.clear()
        return out

    try:
        for k, frame in enumerate(frames):
            # Rounded to float32 as decord's timestamps are, so both decoders give a good file the same times.
            t = float(np.float32(frame.time if frame.pts is not None else k / (rate or 1.0)))
            if take(t):
                rgb.append(frame.to_ndarray(format="rgb24"))
                index.append(k)
                time.append(t)
                if len(rgb) == batch_size:
                    yield chunk()
    except StreamBroken:
        if rgb:
            yield chunk()
        raise
    if rgb:
        yield chunk()


def _open_image(source: Source) -> tuple[VideoInfo, Iterator[Chunk]]:
    import cv2

    bgr = cv2.imread(str(source.path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DecodeError("cannot read the image (corrupt or not an image)")
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    info = VideoInfo(0.0, 1, rgb.shape[1], rgb.shape[0], 1, decoder="opencv")
    chunk = Chunk(rgb[None], np.zeros(1, np.int32), np.zeros(1, np.float64))
    return info, iter([chunk])


def _first_line(e: BaseException) -> str:
    """The message's first non-empty line: decord puts what went wrong there and a C++ stack trace after it. FFmpeg's
    error codes in it are put in words."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    # decord prefixes messages (sometimes nested) with "[hh:mm:ss] /path/to/source.cc:line: "; keep what follows.
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", text).strip()
    # FFmpeg's own codes (AVERROR tags) are 9-10 digit numbers, e.g. "av_read_frame failed with 1094995529".
    return re.sub(r"-?\b\d{9,10}\b", lambda m: f"{m.group()}: {ffmpeg_error(abs(int(m.group())))}", text)


def ffmpeg_error(error: BaseException | int) -> str:
    """An FFmpeg error (PyAV's exception or a code, either sign) in words, with its AVERROR name:
    1094995529 -> "Invalid data found when processing input (AVERROR_INVALIDDATA)"."""
    import av

    code = abs(error if isinstance(error, int) else getattr(error, "errno", None) or 0)
    if not code:
        return " ".join(str(error).split())
    try:
        av.error.err_check(-code)
        words = "unknown error"
    except av.error.FFmpegError as e:
        words = e.strerror or str(e)
    tag = {t.value: t.name for t in av.error.ErrorType}.get(code)
    name = f"AVERROR_{tag}" if tag else f"AVERROR({errno.errorcode[code]})" if code in errno.errorcode else None
    return f"{words} ({name or f'FFmpeg error {code}'})"
