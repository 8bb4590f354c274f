"""AU rows fused with the measured movement of the same frame (what `affextract run` writes with movement on).

The CNN's AU head can only restate what its expression trunk encodes; the blendshapes of the same frame measure the
movement. Per fused AU:

    p = sigmoid(a * logit(p_cnn) + b * logit(evidence) + c)

with `evidence` the AU's blendshape coefficient (`teacher.au_evidence`: pairs by maximum, AU25 jawOpen less
mouthClose). AU11 and AU23 have no counterpart and AUs whose evidence failed the check (the distrust list) keep the
CNN's row, and so does every AU of a frame where the mesh did not find the face (presence < 0.5). The parameters
ship as `weights/au_fusion.safetensors` + `.json` (version, SHA-256, inputs, training data, the rule; model card:
`weights/mma_ferplus_small.md`, "AU fusion"). This module is the rule and its file; fitting it
(`affextract train --fusion`, on FER+ train from the cached blendshapes) is affextract.training.fusion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from affextract.schema import AU, AUS, BLENDSHAPE_NAMES, WEIGHTS_DIR

FUSION_WEIGHTS = WEIGHTS_DIR / "au_fusion.safetensors"
FUSION_FORMAT = "affextract-au-fusion"
FUSION_VERSION = 1
CNN_SOURCE = "cnn"  # the file's au_source when the AU rows are the CNN's alone (--no-movement, --cnn-aus)
INPUTS = ("logit_cnn", "logit_evidence", "bias")  # the columns of AUFusion.coef
CNN_EPS, EVIDENCE_EPS = 1e-4, 1e-6  # probabilities and coefficients are clipped to [eps, 1 - eps] before the logit
MIN_PRESENCE = 0.5  # MediaPipe reports no face below this mesh presence: the frame keeps the CNN's AU rows


def logit(p: np.ndarray, eps: float) -> np.ndarray:
    """log(p / (1 - p)) in float64, p clipped to [eps, 1 - eps] first."""
    p = np.clip(np.asarray(p, np.float64), eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


@dataclass(frozen=True)
class AUFusion:
    """Fusion parameters: which AU rows are fused and each one's logistic."""

    coef: np.ndarray  # (17, 3) a, b, c of each AU in AUS order (INPUTS); rows of AUs not fused are unused
    fused: tuple[int, ...]  # AUs whose rows are fused; the others keep the CNN's rows
    version: int = FUSION_VERSION
    sha256: str = ""  # of the file it was loaded from ("" when not loaded from one)

    def __post_init__(self):
        if np.shape(self.coef) != (len(AUS), len(INPUTS)):
            raise ValueError(f"fusion coefficients have shape {np.shape(self.coef)}; "
                             f"expected ({len(AUS)}, {len(INPUTS)})")
        bad = sorted(set(self.fused) - set(AUS) | set(self.fused) & {11, 23})
        if bad:
            raise ValueError(f"AUs {bad} cannot be fused: they are not among {AUS} or have no blendshape counterpart")

    @property
    def source(self) -> str:
        """The file's au_source attribute for rows made by this fusion."""
        return f"fused:{self.version}:{self.sha256}"

    def fuse(self, cnn_au: np.ndarray, evidence: np.ndarray) -> np.ndarray:
        """(N, 17) CNN AU probabilities and (N, 17) raw evidence (teacher.au_evidence) -> (N, 17) AU rows."""
        out = np.array(cnn_au, np.float32, copy=True)
        if not len(out):
            return out
        for au in self.fused:
            j = AUS.index(au)
            a, b, c = self.coef[j]
            z = a * logit(cnn_au[:, j], CNN_EPS) + b * logit(evidence[:, j], EVIDENCE_EPS) + c
            out[:, j] = 1.0 / (1.0 + np.exp(-z))
        return out

    def __call__(self, features: np.ndarray, blendshapes: np.ndarray, presence: np.ndarray) -> np.ndarray:
        """(N, 26) features, (N, 52) blendshapes (BLENDSHAPE_NAMES order) and (N,) mesh presence of the same frames ->
        the features with the AU rows fused on frames whose mesh found the face (presence >= MIN_PRESENCE)."""
        from affextract.training.teacher import au_evidence

        out = np.array(features, np.float32, copy=True)
        ok = np.nan_to_num(np.asarray(presence, np.float32), nan=0.0) >= MIN_PRESENCE
        if ok.any():
            out[ok, AU] = self.fuse(out[ok, AU], au_evidence(np.asarray(blendshapes)[ok], BLENDSHAPE_NAMES))
        return out


REMAKE = "refit it with `affextract train --fusion`"  # how a missing or damaged fusion file is made again


def save_fusion(fusion: AUFusion, path: Path | str, metadata: dict) -> str:
    """Write `path` (.safetensors) and its .json record (version, inputs, fused AUs, `metadata`: training data, rule,
    scores); return the SHA-256."""
    import torch

    from affextract.weights import write_weights

    doc = {"version": fusion.version, "feature_names": list(INPUTS), "aus": list(AUS), "fused": list(fusion.fused),
           "clip_eps": {"cnn": CNN_EPS, "evidence": EVIDENCE_EPS}, "min_presence": MIN_PRESENCE, **metadata}
    return write_weights({"coef": torch.from_numpy(np.asarray(fusion.coef, np.float32))}, path, FUSION_FORMAT, doc)


def load_fusion(path: Path | str | None = None) -> AUFusion:
    """The fusion in `path` (None = the shipped au_fusion); refuses a file whose SHA-256 differs from its .json."""
    from affextract.weights import read_weights

    path = Path(path) if path is not None else FUSION_WEIGHTS
    state, doc = read_weights(path, FUSION_FORMAT, "AU fusion parameters", REMAKE, fields=("version", "fused"))
    if tuple(doc.get("feature_names", ())) != INPUTS or tuple(doc.get("aus", ())) != AUS:
        raise ValueError(f"{path.with_suffix('.json')}: inputs or AUs differ from this affextract's {INPUTS}, {AUS}")
    return AUFusion(coef=state["coef"].numpy(), fused=tuple(doc["fused"]), version=int(doc["version"]),
                    sha256=doc["sha256"])


def au_source(fused: bool, path: Path | str | None = None) -> str:
    """The au_source a run records (CNN_SOURCE, or "fused:<version>:<SHA-256>" of the fusion file), read from the
    file's record without importing torch; load_fusion checks the file against it."""
    from affextract.weights import read_record

    if not fused:
        return CNN_SOURCE
    path = Path(path) if path is not None else FUSION_WEIGHTS
    doc = read_record(path, FUSION_FORMAT, "pass another --fusion-weights or --cnn-aus", fields=("version",))
    return f"fused:{doc['version']}:{doc['sha256']}"


def describe_features(source: str) -> tuple[str, ...]:
    """What the 26 rows of a file whose au_source is `source` are, one line per group (for `info` and `export`)."""
    lines = ("valence, arousal: derived from the expression probabilities through per-expression word centroids "
             "(not measured)",
             "neutral..surprise: probabilities of a CNN trained only on FER+ (48x48 grey web faces)")
    if source == CNN_SOURCE:
        return lines + ("AU1..AU26: the CNN's AU head alone (not fused with the measured movement)",)
    meta = FUSION_WEIGHTS.with_suffix(".json")
    doc = json.loads(meta.read_text()) if meta.is_file() else {}
    if not source.endswith(":" + doc.get("sha256", "-")):
        return lines + (f"AU rows: fused with the measured movement by the fusion file {source} (its .json lists "
                        "which AUs)",)
    fused = doc["fused"]
    return lines + (
        " ".join(f"AU{a}" for a in fused) + ": fused with the frame's measured movement (blendshapes) where the "
        f"mesh found the face (presence >= {MIN_PRESENCE}), else the CNN's",
        " ".join(f"AU{a}" for a in AUS if a not in fused) + ": the CNN's alone (AU11, AU23: no blendshape "
        "counterpart, the expressions' Table-1 prior; the others' evidence failed the check)")
