"""Every shipped weights file is pinned by its SHA-256, so new weights (a .safetensors replaced together with its
.json, whose own recorded digest then still matches) never ship unnoticed and always come with a new release."""

from __future__ import annotations

import json

from affextract.schema import WEIGHTS_DIR
from affextract.weights import file_sha256

# One row per release of a shipped file: (file stem, release, SHA-256 of the .safetensors, SHA-256 of the .json).
# A release is the MMA's metadata.version, the AU fusion's version, or for MediaPipe's models the SHA-256 of the upstream file they were
# converted from (source_sha256). To ship new weights: bump the release (metadata.version in the .json), then ADD a
# row below with it and the new digests (`sha256sum affextract/weights/NAME.*`); keep the old rows, and update the
# model card. Only the .json changed (a corrected description)? Replace that row's json digest.
RELEASES = [
    ("mediapipe_blendshapes", "4f36dded049d",
     "e1efad88125c4ce39163306683beca5fe96a94fbd6381c57347fb23cdefc9906",
     "8cee673aaf733d738bff58911b46b91c2d4a9df1c57f6d9127f95cae21fca6f0"),
    ("mediapipe_face_geometry", "bdbcda96dfcb",
     "75e779f9ad547966c81f15c5da01ae694904dad64fadc681c1f557046d1cb3b6",
     "18626455f65950f2e9cc0565058c241c92b656bdd35c4252af7f1e5467ae1901"),
    ("mediapipe_face_mesh_v2", "bc5ee5de06d8",
     "3b630155e3d68d47040106498f1916b5eba52d7a3370162a69a2a171104c3fbf",
     "13d733dcd0835a4cab3df0c90ad41fe389be3104e8e4bc28b7e029f04b78f2f9"),
    ("mma_ferplus_small", 3,
     "379f50074b8eb187ce9aebc59e42b5cec09e268de377bafac05f13a6f67e2a7d",
     "855ecefdf48b69f28850abf5250284a059b7941951d0010207bc7964626c762d"),
    ("au_fusion", 1,
     "c9befc95e9dca58a62d6961d07cc3b6e4964d24b65517db82eab13b3e680ef39",
     "09da0799accbf28d1eafcc2dfbbc6789cb3a534d583e023d974b3cb4be8b3883"),
]


def release_of(doc: dict) -> object:
    """The release a weights description names: the MMA's metadata.version, the fusion's version, else the upstream
    file's digest."""
    version = doc.get("metadata", {}).get("version", doc.get("version"))
    return version if version is not None else doc.get("source_sha256", "")[:12]


def test_every_shipped_weights_file_matches_its_latest_pinned_release():
    how = ("If these weights are a deliberate new release: bump metadata.version in the .json, add a row to RELEASES "
           "in tests/test_weights_pins.py with that version and the new digests (sha256sum affextract/weights/*), "
           "and update the model card.")
    stems = sorted({p.stem for p in WEIGHTS_DIR.glob("*.safetensors")} | {p.stem for p in WEIGHTS_DIR.glob("*.json")})
    pinned = {r[0] for r in RELEASES}
    assert set(stems) <= pinned, f"unpinned weights files {sorted(set(stems) - pinned)} in {WEIGHTS_DIR}. {how}"
    for stem in stems:
        rows = [r for r in RELEASES if r[0] == stem]
        releases = [r[1] for r in rows]
        assert len(set(releases)) == len(releases), f"{stem}: two rows of RELEASES share a release; each new " \
                                                    f"set of weights needs a new one. {how}"
        _, release, weights_sha, json_sha = rows[-1]  # the latest release: the last row of the file
        doc = json.loads((WEIGHTS_DIR / f"{stem}.json").read_text())
        actual = file_sha256(WEIGHTS_DIR / f"{stem}.safetensors")
        if actual != weights_sha:
            earlier = [r[1] for r in rows[:-1] if r[2] == actual]
            assert not earlier, f"{stem}.safetensors is release {earlier[0]}'s, older than the pinned {release}"
            assert release_of(doc) != release, (f"{stem}.safetensors changed (SHA-256 {actual}, pinned {weights_sha}) "
                                                f"but its .json still names release {release}. {how}")
            raise AssertionError(f"{stem}.safetensors is release {release_of(doc)!r}, not pinned (latest pinned: "
                                 f"{release}, SHA-256 {weights_sha}; this file: {actual}). {how}")
        assert release_of(doc) == release, f"{stem}.json names release {release_of(doc)!r}, pinned {release!r}. {how}"
        assert doc["sha256"] == actual, f"{stem}.json records SHA-256 {doc['sha256']}, the file has {actual}"
        json_actual = file_sha256(WEIGHTS_DIR / f"{stem}.json")
        assert json_actual == json_sha, (f"{stem}.json changed (SHA-256 {json_actual}, pinned {json_sha}). If only "
                                         f"its description changed, put the new digest in its RELEASES row. {how}")
