from pathlib import Path

import numpy as np
import pytest

from affextract.video import DecodeError, StreamBroken, find_sources, open_video, sample_indices
from conftest import astronaut_frames, garble_second_half, read_all, truncate_download, write_video


def decode_all(src, fps=None, batch=8):
    info, chunks = open_video(src, fps, batch)
    got, broken = [], None
    try:
        for c in chunks:
            got.append(c)
    except StreamBroken as e:
        broken = e
    return info, got, broken


def frames_of(chunks):
    return np.concatenate([c.frames for c in chunks]), np.concatenate([c.frame for c in chunks])


def test_find_sources_keys_and_ignored(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    write_video(tmp_path / "a" / "b" / "x.mp4", astronaut_frames(3))
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "pic.PNG").write_bytes(b"")
    sources, ignored = find_sources([tmp_path])
    assert [s.key for s in sources] == ["a/b/x.mp4", "pic.PNG"]
    assert ignored == [tmp_path / "notes.txt"]
    # a file named explicitly is tried whatever its extension (but .txt and .csv, which list videos: manifests)
    (tmp_path / "notes.dat").write_text("hi")
    sources, _ = find_sources([tmp_path / "notes.dat"])
    assert [s.key for s in sources] == ["notes.dat"]


def test_find_sources_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        find_sources([tmp_path / "nope.mp4"])
    (tmp_path / "d1").mkdir(), (tmp_path / "d2").mkdir()
    for d in ("d1", "d2"):
        (tmp_path / d / "same.mp4").write_bytes(b"x")
    with pytest.raises(ValueError, match="same key 'same.mp4'"):
        find_sources([tmp_path / "d1" / "same.mp4", tmp_path / "d2" / "same.mp4"])


def test_decode_all_frames_in_chunks(tmp_path):
    src = find_sources([write_video(tmp_path / "v.mp4", astronaut_frames(20))])[0][0]
    info, chunks, broken = decode_all(src, batch=8)
    assert broken is None
    assert (info.frames_total, info.width, info.height) == (20, 320, 240)
    assert info.fps == pytest.approx(25.0)
    assert [len(c.frame) for c in chunks] == [8, 8, 4]
    assert np.array_equal(np.concatenate([c.frame for c in chunks]), np.arange(20))
    assert np.allclose(np.concatenate([c.time for c in chunks]), np.arange(20) / 25.0, atol=1e-3)
    assert chunks[0].frames.shape == (8, 240, 320, 3) and chunks[0].frames.dtype == np.uint8


def test_sample_indices_by_timestamp():
    ts = np.arange(60) / 30.0  # 2 s at 30 fps
    assert sample_indices(ts, None).tolist() == list(range(60))
    assert sample_indices(ts, 10).tolist() == list(range(0, 60, 3))
    assert sample_indices(ts, 1).tolist() == [0, 30]
    assert sample_indices(ts, 1000).tolist() == list(range(60))  # never more frames than the stream has
    ts32 = (np.arange(15) / 10.0).astype(np.float32).astype(np.float64)  # decord's float32 timestamps
    assert sample_indices(ts32, 10).tolist() == list(range(15))  # the last frame is not lost to rounding


def test_fps_subsampling_when_decoding(tmp_path):
    src = find_sources([write_video(tmp_path / "v.mp4", astronaut_frames(50))])[0][0]
    info, chunks, _ = decode_all(src, fps=5)
    frames = np.concatenate([c.frame for c in chunks])
    assert frames.tolist() == list(range(0, 50, 5)) and info.frames_analysed == 10


@pytest.mark.parametrize("content,why", [(b"", "the file is empty"), (b"this is not a video\n", "cannot decode")])
def test_unreadable_files_raise_decode_error(tmp_path, content, why):
    p = tmp_path / "bad.mp4"
    p.write_bytes(content)
    with pytest.raises(DecodeError, match=why):
        open_video(find_sources([p])[0][0], None, 8)


def test_stream_broken_part_way_keeps_the_same_frames_every_time(tmp_path):
    good = write_video(tmp_path / "good.mp4", astronaut_frames(40))
    _, intact, _ = decode_all(find_sources([good])[0][0])
    intact, _ = frames_of(intact)
    p = garble_second_half(write_video(tmp_path / "g.mp4", astronaut_frames(40)))
    whole = sum(1 for pos, n in packet_spans(p) if pos + n <= p.stat().st_size // 2)  # frames before the noise
    runs = [read_all(find_sources([p])[0][0]) for _ in range(3)]
    info, chunks, broken = runs[0]
    frames, index = frames_of(chunks)
    kept = len(index)
    assert info.decoder == "pyav" and whole <= kept < 40
    assert np.array_equal(index, np.arange(kept)) and np.array_equal(frames[:whole], intact[:whole])
    assert f"stream broke at frame {kept}: Invalid data found when processing input (AVERROR_INVALIDDATA)" in str(broken)
    assert "truncated or damaged" in str(broken) and "/github" not in str(broken)
    for info2, chunks2, broken2 in runs[1:]:  # decord's reading-ahead thread once made each run keep other frames
        frames2, index2 = frames_of(chunks2)
        assert np.array_equal(index2, index) and np.array_equal(frames2, frames) and str(broken2) == str(broken)


def packet_spans(path):
    import av

    with av.open(str(path)) as c:
        return [(p.pos, p.size) for p in c.demux(c.streams.video[0]) if p.size]


@pytest.mark.parametrize("mid_frame", [False, True])
def test_truncated_download_keeps_its_frames(tmp_path, mid_frame):
    good = write_video(tmp_path / "good.mp4", astronaut_frames(30))
    _, intact, _ = decode_all(find_sources([good])[0][0])
    intact, _ = frames_of(intact)
    src = find_sources([truncate_download(good, tmp_path / "cut.mp4", 12, mid_frame)])[0][0]
    with pytest.raises(DecodeError, match="truncated|cannot decode"):
        open_video(src, None, 8)  # decord alone: the cut stops it opening, or it finds fewer frames than listed
    info, chunks, broken = read_all(src, batch=5)
    frames, index = frames_of(chunks)
    # A frame cut in half may still decode (damaged: FFmpeg conceals what is missing); frames 0-11 are whole.
    assert info.decoder == "pyav" and info.frames_total == 30 and len(index) == 12 + (mid_frame and len(index) > 12)
    assert np.array_equal(index, np.arange(len(index))) and np.array_equal(frames[:12], intact[:12])
    assert f"stream broke at frame {len(index)}" in str(broken) and "re-download" in str(broken)


@pytest.mark.parametrize("name,fps", [("v.mp4", None), ("v.mp4", 5), ("v.avi", 7)])
def test_pyav_decodes_good_files_as_decord_does(tmp_path, carphone, name, fps):
    sources = [find_sources([write_video(tmp_path / name, astronaut_frames(23))])[0][0], find_sources([carphone])[0][0]]
    for src in sources:
        info_d, chunks_d, _ = decode_all(src, fps)
        info_p, chunks_p, broken = decode_all_with(src, fps, "pyav")
        assert broken is None and info_p.decoder == "pyav"
        assert [getattr(info_p, f) for f in ("fps", "frames_total", "width", "height", "frames_analysed")] == \
            [getattr(info_d, f) for f in ("fps", "frames_total", "width", "height", "frames_analysed")]
        assert [len(c.frame) for c in chunks_p] == [len(c.frame) for c in chunks_d]
        for a, b in zip(chunks_p, chunks_d):
            assert np.array_equal(a.frame, b.frame) and np.array_equal(a.time, b.time)
            assert np.array_equal(a.frames, b.frames)


def decode_all_with(src, fps, decoder, batch=8):
    info, chunks = open_video(src, fps, batch, decoder=decoder)
    got, broken = [], None
    try:
        got.extend(chunks)
    except StreamBroken as e:
        broken = e
    return info, got, broken


def test_still_image_is_one_frame_video(tmp_path):
    import cv2
    from skimage import data

    p = tmp_path / "a.png"
    cv2.imwrite(str(p), data.astronaut()[:, :, ::-1])
    info, chunks, _ = decode_all(find_sources([p])[0][0])
    assert info.frames_total == 1 and chunks[0].frames.shape == (1, 512, 512, 3)
    assert np.array_equal(chunks[0].frames[0], data.astronaut())
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(DecodeError, match="cannot read the image"):
        open_video(find_sources([bad])[0][0], None, 8)


def test_every_image_extension_is_found_and_decoded_by_run_and_the_image_folders(tmp_path):
    """One list of image suffixes serves `run` (find_sources, the image decoder) and the labelled image folders
    (datasets.load_folder): every suffix on it must be found by both and decoded."""
    import cv2
    from skimage import data

    from affextract.training.datasets import load_folder
    from affextract.video import IMAGE_EXTENSIONS

    face = data.astronaut()[::4, ::4]  # (128, 128, 3)
    folder = tmp_path / "happiness"
    folder.mkdir()
    for ext in sorted(IMAGE_EXTENSIONS):
        pixels = face.mean(2).astype(np.uint8) if ext == ".pgm" else face[:, :, ::-1]  # .pgm is grey only
        assert cv2.imwrite(str(folder / f"a{ext}"), pixels), ext
    sources, ignored = find_sources([folder])
    assert sorted(s.path.suffix for s in sources) == sorted(IMAGE_EXTENSIONS) and not ignored
    for s in sources:
        _, chunks, broken = decode_all(s)
        assert broken is None and chunks[0].frames.shape == (1, 128, 128, 3), s.path.name
    assert sorted(p.suffix for p in load_folder(tmp_path).images) == sorted(IMAGE_EXTENSIONS)


def test_decoder_errors_keep_their_first_line_not_the_stack_trace():
    from affextract.video import _first_line

    error = RuntimeError("[12:00:00] /github/workspace/src/video/video_reader.cc:83: ERROR opening: x.mp4, Invalid data "
                         "found when processing input\n\nStack trace:\n  [bt] (0) /usr/lib/libdecord.so(+0x1f2a3) [0x7f]\n")
    assert _first_line(error) == "ERROR opening: x.mp4, Invalid data found when processing input"
    raw = RuntimeError("[12:00:00] /github/workspace/src/video/video_reader.cc:151: av_read_frame failed with 1094995529")
    assert _first_line(raw) == ("av_read_frame failed with 1094995529: Invalid data found when processing input "
                                "(AVERROR_INVALIDDATA)")
