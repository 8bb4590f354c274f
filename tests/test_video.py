from pathlib import Path

import numpy as np
import pytest

from affextract.video import DecodeError, StreamBroken, find_sources, open_video, sample_indices
from conftest import astronaut_frames, garble_second_half, write_video


def decode_all(src, fps=None, batch=8):
    info, chunks = open_video(src, fps, batch)
    got, broken = [], None
    try:
        for c in chunks:
            got.append(c)
    except StreamBroken as e:
        broken = e
    return info, got, broken


def test_find_sources_keys_and_ignored(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    write_video(tmp_path / "a" / "b" / "x.mp4", astronaut_frames(3))
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "pic.PNG").write_bytes(b"")
    sources, ignored = find_sources([tmp_path])
    assert [s.key for s in sources] == ["a/b/x.mp4", "pic.PNG"]
    assert ignored == [tmp_path / "notes.txt"]
    # a file named explicitly is tried whatever its extension
    sources, _ = find_sources([tmp_path / "notes.txt"])
    assert [s.key for s in sources] == ["notes.txt"]


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


def test_stream_broken_part_way_keeps_decoded_frames(tmp_path):
    p = garble_second_half(write_video(tmp_path / "g.mp4", astronaut_frames(40)))
    info, chunks, broken = decode_all(find_sources([p])[0][0])
    kept = sum(len(c.frame) for c in chunks)
    assert broken is not None and "stream broke at frame" in str(broken) and "/github" not in str(broken)
    assert 0 < kept < 40
    assert np.array_equal(np.concatenate([c.frame for c in chunks]), np.arange(kept))


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


def test_decoder_errors_keep_their_first_line_not_the_stack_trace():
    from affextract.video import _first_line

    error = RuntimeError("[12:00:00] /github/workspace/src/video/video_reader.cc:83: ERROR opening: x.mp4, Invalid data "
                         "found when processing input\n\nStack trace:\n  [bt] (0) /usr/lib/libdecord.so(+0x1f2a3) [0x7f]\n")
    assert _first_line(error) == "ERROR opening: x.mp4, Invalid data found when processing input"
