"""`affextract plot`: timeline PNGs (and contact sheets re-decoded from the source) of real extracted videos."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from affextract.cli import app
from affextract.features import open_features
from affextract.plot import (PlotOptions, SourceNotFound, find_source, plot_timeline, read_frames, sample_crops,
                             timeline_figure)
from affextract.format import MOVEMENT_OFF
from affextract.store import FeatureWriter
from conftest import astronaut_frames, noface_frames, write_video


def flat(text: str) -> str:
    return " ".join(text.split())


def png_size(path) -> tuple[int, int]:
    """(width, height) in pixels, read back from the PNG."""
    import matplotlib.image

    h, w = matplotlib.image.imread(path).shape[:2]
    return w, h


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, weights):
    """A talking-face clip whose face leaves for a while, extracted for real into out.h5 beside it."""
    from affextract.extract import ExtractOptions, extract

    d = tmp_path_factory.mktemp("plotvid")
    (d / "sub").mkdir()
    frames = np.concatenate([astronaut_frames(12), noface_frames(6), astronaut_frames(6)])
    write_video(d / "sub" / "clip.mp4", frames, fps=10)
    out = d / "out.h5"
    report = extract([d], out, ExtractOptions(weights=weights, device="cpu"))
    assert report.written == ["sub/clip.mp4"], report
    return d, out


def test_timeline_png(extracted, tmp_path):
    d, h5 = extracted
    with open_features(h5) as ff:
        v = ff["sub/clip.mp4"]
    assert v.face[:12].all() and not v.face[12:18].any()  # the gap the plot must shade
    drawn = []
    import matplotlib.pyplot as plt
    close = plt.close
    with pytest.MonkeyPatch.context() as mp:  # keep the figure to read back what was drawn on it
        mp.setattr(plt, "close", lambda fig=None: drawn.append(fig))
        out = plot_timeline(h5, "clip.mp4", tmp_path / "t.png")
    w, h = png_size(out)
    # five panels: valence/arousal, expressions, AUs, head pose, blendshapes
    assert out == tmp_path / "t.png" and 1200 <= w <= 1600 and 1700 <= h <= 2300
    assert 20_000 < out.stat().st_size < 3_000_000
    (fig,) = drawn
    try:
        by_label = {ax.get_ylabel(): ax for ax in fig.axes if ax.get_ylabel()}
        lines = {ln.get_label(): ln for ax in fig.axes for ln in ax.get_lines() if not ln.get_label().startswith("_")}
        np.testing.assert_allclose(lines["valence"].get_xydata(), np.c_[v.time, v["valence"]], equal_nan=True)
        np.testing.assert_allclose(lines["arousal"].get_xydata(), np.c_[v.time, v["arousal"]], equal_nan=True)
        assert lines["valence"].axes is by_label["valence / arousal"]
        for i, name in enumerate(("yaw", "pitch", "roll")):
            np.testing.assert_allclose(lines[name].get_ydata(), v.pose[:, i], equal_nan=True)
            assert lines[name].axes is by_label["head pose (°)"]
        from matplotlib.collections import QuadMesh

        (au,) = [c for c in by_label["action unit"].collections if isinstance(c, QuadMesh)]
        np.testing.assert_allclose(np.ma.filled(au.get_array(), np.nan).reshape(17, len(v)), v.aus.T, equal_nan=True)
        assert [t.get_text() for t in by_label["action unit"].get_yticklabels()][:3] == ["AU1", "AU2", "AU4"]
        blend = next(ax for ax in fig.axes
                     if ax.get_yticklabels() and ax.get_yticklabels()[0].get_text() == "browDownLeft")
        (bs,) = [c for c in blend.collections if isinstance(c, QuadMesh)]
        np.testing.assert_allclose(np.ma.filled(bs.get_array(), np.nan).reshape(51, len(v)), v.blendshapes[:, 1:].T,
                                   equal_nan=True)
        assert "face on 75%" in fig._suptitle.get_text() and "sub/clip.mp4" in fig._suptitle.get_text()
    finally:
        close(fig)
    # A file without measured movement (--no-movement, or written before it existed) gets the first three only.
    with open_features(h5) as ff:
        with FeatureWriter(tmp_path / "plain.h5", replace(ff.provenance, movement=MOVEMENT_OFF)) as plain:
            plain.add(replace(ff["sub/clip.mp4"], extra={}))
    w, h = png_size(plot_timeline(tmp_path / "plain.h5", "clip.mp4", tmp_path / "plain.png"))
    assert 1200 <= w <= 1600 and 800 <= h <= 1200


def test_contact_sheet_found_beside_the_h5_file(extracted, tmp_path, monkeypatch):
    d, h5 = extracted
    monkeypatch.chdir(tmp_path)  # not the video's folder: the source is found beside out.h5
    out = plot_timeline(h5, "sub/clip.mp4", tmp_path / "c.png", PlotOptions(crops=6))
    plain = plot_timeline(h5, "sub/clip.mp4", tmp_path / "p.png")
    assert png_size(out)[0] == png_size(plain)[0] and png_size(out)[1] > png_size(plain)[1] + 200
    assert out.stat().st_size > plain.stat().st_size + 50_000  # the photographs add detail


def test_crops_sample_the_whole_video_and_redecode_the_same_pixels(extracted):
    from affextract.video import find_sources, open_video

    d, h5 = extracted
    with open_features(h5) as ff:
        v = ff["sub/clip.mp4"]
    rows = sample_crops(v, 6)
    assert len(rows) == 6 and rows[0] == 0 and rows[-1] == len(v) - 1 and np.all(np.diff(rows) > 0)
    assert not v.face[rows].all()  # frames of the gap are sampled too
    assert len(sample_crops(v, 100)) == len(v)
    src = find_source(v, h5)
    assert src == d / "sub" / "clip.mp4"
    (source,), _ = find_sources([src])
    _, chunks = open_video(source, None, 64)
    decoded = np.concatenate([c.frames for c in chunks])
    np.testing.assert_array_equal(read_frames(src, v.frame[rows]), decoded[v.frame[rows]])


def _drawn(fig) -> tuple[list[float], list[str], dict[str, int], list[str]]:
    """What a timeline figure shows: the contact sheet's frame times and captions, the dotted markers by kind and
    the legend entries."""
    captions = [ax.get_title() for ax in fig.axes if " s (frame " in ax.get_title()]
    times = [float(c.split(" s (frame ")[0]) for c in captions]
    markers: dict[str, int] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_gid():
                markers[line.get_gid()] = markers.get(line.get_gid(), 0) + 1
    legend = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    return times, captions, markers, legend


def test_contact_sheet_spans_the_video_and_marks_frames_without_a_face(extracted):
    import matplotlib.pyplot as plt

    _, h5 = extracted
    with open_features(h5) as ff:
        v = ff["sub/clip.mp4"]
    fig = timeline_figure(h5, "clip.mp4", PlotOptions(crops=8))
    times, captions, markers, legend = _drawn(fig)
    plt.close(fig)
    rows = sample_crops(v, 8)
    missed = int((~v.face[rows]).sum())
    assert missed >= 1 and len(captions) == 8
    assert min(times) == pytest.approx(v.time[0], abs=0.05) and max(times) == pytest.approx(v.time[-1], abs=0.05)
    assert sum("no face found" in c for c in captions) == missed
    assert markers == {"sampled-face": 8 - missed, "sampled-no-face": missed}
    assert "frames shown below" in legend and "shown, no face found" in legend


def test_contact_sheet_of_a_video_without_any_face_shows_its_frames(weights, tmp_path):
    import matplotlib.pyplot as plt

    from affextract.extract import ExtractOptions, extract

    write_video(tmp_path / "empty_room.mp4", noface_frames(10), fps=10)
    extract([tmp_path / "empty_room.mp4"], tmp_path / "e.h5", ExtractOptions(weights=weights, movement=False))
    fig = timeline_figure(tmp_path / "e.h5", "empty_room.mp4", PlotOptions(crops=4))
    times, captions, markers, _ = _drawn(fig)
    plt.close(fig)
    assert len(captions) == 4 and all("no face found" in c for c in captions) and markers == {"sampled-no-face": 4}
    assert times[0] == 0.0 and times[-1] == pytest.approx(0.9)


def test_source_found_from_another_folder_by_its_stored_path_else_every_place_tried_is_named(extracted, tmp_path,
                                                                                               monkeypatch):
    import h5py

    d, h5 = extracted
    monkeypatch.chdir(tmp_path)
    alone = tmp_path / "elsewhere" / "copy.h5"  # neither the h5 nor the current folder holds sub/clip.mp4
    alone.parent.mkdir()
    alone.write_bytes(h5.read_bytes())
    plot_timeline(alone, "clip.mp4", tmp_path / "s.png", PlotOptions(crops=2))  # found where it was extracted from
    with h5py.File(alone, "a") as f:  # the videos have moved since
        f["videos/sub%2Fclip.mp4"].attrs["path"] = str(tmp_path / "gone" / "clip.mp4")
    with pytest.raises(SourceNotFound) as e:
        plot_timeline(alone, "clip.mp4", tmp_path / "x.png", PlotOptions(crops=4))
    msg = str(e.value)
    assert str(tmp_path / "gone" / "clip.mp4") in msg and str(tmp_path / "sub" / "clip.mp4") in msg
    assert "--root" in msg and "--video-path" in msg
    assert not (tmp_path / "x.png").exists()
    # --root and --video-path both resolve it
    plot_timeline(alone, "clip.mp4", tmp_path / "r.png", PlotOptions(crops=2, root=d))
    plot_timeline(alone, "clip.mp4", tmp_path / "v.png", PlotOptions(crops=2, video_path=d / "sub" / "clip.mp4"))
    assert (tmp_path / "r.png").exists() and (tmp_path / "v.png").exists()
    with pytest.raises(SourceNotFound, match="does not exist"):
        plot_timeline(alone, "clip.mp4", tmp_path / "x.png", PlotOptions(crops=2, video_path=tmp_path / "no.mp4"))


def test_cli_plot(extracted, tmp_path):
    d, h5 = extracted
    runner = CliRunner()
    r = runner.invoke(app, ["plot", str(h5), "clip.mp4", "-o", str(tmp_path / "cli.png"), "--crops", "--n-crops", "3",
                            "--root", str(d)])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "cli.png").stat().st_size > 20_000
    r = runner.invoke(app, ["plot", str(h5), "other.mp4", "-o", str(tmp_path / "n.png")])
    assert r.exit_code == 2 and "no video 'other.mp4'" in flat(r.output)
    r = runner.invoke(app, ["plot", str(h5), "clip.mp4", "-o", str(tmp_path / "n.png"), "--crops",
                            "--root", str(tmp_path)])
    assert r.exit_code == 2 and "cannot find the source" in flat(r.output)
    assert not os.path.exists(tmp_path / "n.png")
