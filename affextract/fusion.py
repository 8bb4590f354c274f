"""AU rows fused with the measured movement of the same frame (what `affextract run` writes with movement on).

The CNN's AU head can only restate what its expression trunk encodes; the blendshapes of the same frame measure the
movement. Per fused AU:

    p = sigmoid(a * logit(p_cnn) + b * logit(evidence) + c)

with `evidence` the AU's blendshape coefficient (`teacher.au_evidence`: pairs by maximum, AU25 jawOpen less
mouthClose). AU11 and AU23 have no counterpart and AUs whose evidence failed the check (the distrust list) keep the
CNN's row, and so does every AU of a frame where the mesh did not find the face (presence < 0.5). The parameters
ship as `weights/au_fusion.safetensors` + `.json` (version, SHA-256, inputs, training data, the rule; model card:
`weights/mma_ferplus_small.md`, "AU fusion"); `train_fusion` refits them on FER+ train from the cached
blendshapes (`affextract train --fusion`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from affextract.schema import AU, AU_PRIOR, AUS, BLENDSHAPE_NAMES, EXPRESSIONS, WEIGHTS_DIR

FUSION_WEIGHTS = WEIGHTS_DIR / "au_fusion.safetensors"
FUSION_FORMAT = "affextract-au-fusion"
FUSION_VERSION = 1
CNN_SOURCE = "cnn"  # the file's au_source when the AU rows are the CNN's alone (--no-movement, --cnn-aus)
INPUTS = ("logit_cnn", "logit_evidence", "bias")  # the columns of AUFusion.coef
CNN_EPS, EVIDENCE_EPS = 1e-4, 1e-6  # probabilities and coefficients are clipped to [eps, 1 - eps] before the logit
MIN_PRESENCE = 0.5  # MediaPipe reports no face below this mesh presence: the frame keeps the CNN's AU rows
# Candidate rules of the model card ("AU fusion"): what the per-AU logistic is fitted to, and on which inputs.
RULES = {"teacher": "soft-target BCE to the teacher AUs, inputs logit(p_cnn) and logit(evidence)",
         "labels": "class-balanced BCE, obvious-expression faces against neutral ones, same inputs",
         "evidence": "soft-target BCE to the teacher AUs, logit(evidence) only",
         "mixed": "soft-target BCE to (teacher AU + Table-1 pseudo-AU of the FER+ votes) / 2, inputs logit(p_cnn) and "
                  "logit(evidence)"}
# AU -> FER+ majority labels where the AU is obvious (positives of the "labels" rule and of the teacher's check).
OBVIOUS = {1: ("surprise",), 2: ("surprise",), 5: ("surprise",), 25: ("surprise",), 26: ("surprise",),
           6: ("happiness",), 12: ("happiness",), 9: ("disgust",), 10: ("disgust",),
           4: ("anger", "disgust", "fear"), 7: ("anger",), 15: ("sadness",), 17: ("anger", "disgust", "sadness"),
           20: ("fear",), 24: ("anger", "disgust")}


def _logit(p: np.ndarray, eps: float) -> np.ndarray:
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
            z = a * _logit(cnn_au[:, j], CNN_EPS) + b * _logit(evidence[:, j], EVIDENCE_EPS) + c
            out[:, j] = 1.0 / (1.0 + np.exp(-z))
        return out

    def __call__(self, features: np.ndarray, blendshapes: np.ndarray, presence: np.ndarray) -> np.ndarray:
        """(N, 26) features, (N, 52) blendshapes (BLENDSHAPE_NAMES order) and (N,) mesh presence of the same frames ->
        the features with the AU rows fused on frames whose mesh found the face (presence >= MIN_PRESENCE)."""
        from affextract.teacher import au_evidence

        out = np.array(features, np.float32, copy=True)
        ok = np.nan_to_num(np.asarray(presence, np.float32), nan=0.0) >= MIN_PRESENCE
        if ok.any():
            out[ok, AU] = self.fuse(out[ok, AU], au_evidence(np.asarray(blendshapes)[ok], BLENDSHAPE_NAMES))
        return out


def fit_logistic(x: np.ndarray, target: np.ndarray, weight: np.ndarray | None = None, l2: float = 1e-4,
                 steps: int = 100) -> np.ndarray:
    """Logistic regression of soft targets (N,) in [0, 1] on (N, k) inputs plus a bias, by Newton's method on the
    weighted mean BCE with a small L2 penalty on the inputs' weights (not the bias) -> (k + 1,) weights, bias last."""
    x = np.column_stack([np.asarray(x, np.float64), np.ones(len(x))])
    t = np.asarray(target, np.float64)
    w = np.ones(len(x)) if weight is None else np.asarray(weight, np.float64)
    w = w / w.sum()
    reg = np.full(x.shape[1], l2)
    reg[-1] = 0.0
    theta = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-x @ theta))
        grad = x.T @ (w * (p - t)) + reg * theta
        hess = (x * (w * p * (1 - p))[:, None]).T @ x + np.diag(reg) + 1e-12 * np.eye(x.shape[1])
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-9:
            break
    return theta


def fit_fusion(cnn_au: np.ndarray, evidence: np.ndarray, teacher: np.ndarray, expr: np.ndarray,
               fused: tuple[int, ...], rule: str = "mixed") -> AUFusion:
    """Fit the fusion of `fused` AUs by `rule` (RULES) on faces the mesh found: (N, 17) CNN AU probabilities,
    (N, 17) raw evidence, (N, 17) teacher AUs (teacher_aus with nothing distrusted) and (N, 7) expression votes
    (for the "labels" rule's majority labels)."""
    if rule not in RULES:
        raise ValueError(f"unknown fusion rule {rule!r}; one of {sorted(RULES)}")
    coef = np.zeros((len(AUS), len(INPUTS)))
    major = np.where(expr.max(1) > 0.5, expr.argmax(1), -1)
    for au in fused:
        j = AUS.index(au)
        zc, ze = _logit(cnn_au[:, j], CNN_EPS), _logit(evidence[:, j], EVIDENCE_EPS)
        if rule == "labels":
            pos = np.isin(major, [EXPRESSIONS.index(e) for e in OBVIOUS[au]])
            sel = pos | (major == EXPRESSIONS.index("neutral"))
            y = pos[sel].astype(np.float64)
            weight = np.where(y > 0, 0.5 / max(y.sum(), 1), 0.5 / max((1 - y).sum(), 1))
            coef[j] = fit_logistic(np.column_stack([zc[sel], ze[sel]]), y, weight)
        else:
            sel = np.isfinite(teacher[:, j])
            target = teacher[sel, j]
            if rule == "mixed":
                target = 0.5 * (target + expr[sel] @ AU_PRIOR[:, j])
            x = ze[sel, None] if rule == "evidence" else np.column_stack([zc[sel], ze[sel]])
            theta = fit_logistic(x, target)
            coef[j] = (0.0, theta[0], theta[1]) if rule == "evidence" else theta
    return AUFusion(coef=coef.astype(np.float32), fused=tuple(sorted(fused)))


@dataclass(frozen=True)
class FusionOptions:
    """How `affextract train --fusion` refits the AU fusion."""

    cache: Path  # FER+ blendshape cache (tools/ferplus_teacher.py), one row per row of the FER+ .h5
    out: Path  # the .safetensors to write (its .json beside it)
    weights: Path | None = None  # MMA weights whose AU rows are fused; None = the shipped weights
    rule: str = "mixed"  # one of RULES (the card's rule 2 chose "mixed")
    fused: tuple[int, ...] | None = None  # AUs to fuse; None = those of the shipped fusion (chosen on posed faces)


def train_fusion(sets: list, options: FusionOptions) -> tuple[AUFusion, str]:
    """Fit the AU fusion on FER+ FaceSets `sets` (faces whose mesh presence >= MIN_PRESENCE) and write it; return it
    and its SHA-256. The CNN's AU rows of the faces are computed once per weights file and kept beside the output
    (cnn_au_<sha>_<set>.npy), so a refit with other options takes seconds."""
    from affextract.datasets import prepare_inputs
    from affextract.evaluate import predict_inputs
    from affextract.model import load_weights
    from affextract.teacher import TeacherOptions, au_evidence, cached_measures, teacher_aus

    if options.rule not in RULES:
        raise ValueError(f"unknown fusion rule {options.rule!r}; one of {sorted(RULES)}")
    fused = options.fused if options.fused is not None else tuple(
        json.loads(FUSION_WEIGHTS.with_suffix(".json").read_text())["fused"])
    model, info = load_weights(options.weights)
    out = Path(options.out).with_suffix(".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = []
    for fs in sets:
        blend, presence, names = cached_measures(fs, options.cache)
        cached = out.parent / f"cnn_au_{info.sha256[:12]}_{fs.name.replace(':', '_')}_{len(fs)}.npy"
        if cached.is_file():
            cnn = np.load(cached)
        else:
            cnn = predict_inputs(model, prepare_inputs(fs, model))[:, AU]
            np.save(cached, cnn)
        ok = presence >= MIN_PRESENCE
        parts.append((cnn[ok], au_evidence(blend[ok], names),
                      teacher_aus(blend[ok], names, TeacherOptions(distrust=())), fs.expr[ok]))
    fusion = fit_fusion(*(np.concatenate(x) for x in zip(*parts)), fused=tuple(fused), rule=options.rule)
    sha = save_fusion(fusion, out, {
        "rule": options.rule, "rule_text": RULES[options.rule],
        "training_data": ", ".join(f"{fs.name} ({len(fs)} faces)" for fs in sets) + f"; faces whose mesh presence "
                         f">= {MIN_PRESENCE}; blendshapes from {Path(options.cache).name}",
        "mma_weights": {"name": info.name, "sha256": info.sha256},
        "teacher": {"calibration": {str(k): v for k, v in TeacherOptions().calibration.items()}}})
    return load_fusion(out), sha


def measure_set(fs, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(N, 52) blendshapes and (N,) mesh presence of every face of FaceSet `fs`, measured as `affextract run` does:
    the mesh crop placed from the face's 5 points (raw photos: the dataset's points or MTCNN's, as for the MMA;
    aligned crops: the ArcFace template's; FER+-framed images: upscaled x4 with FER+'s points,
    teacher.measure_native)."""
    import torch

    from affextract.datasets import raw_points, read_image
    from affextract.align import crop_faces, invert_affine, roi_from_points
    from affextract.movement import Movement
    from affextract.teacher import measure_native

    if fs.framing == "native":
        m = measure_native(np.stack([read_image(fs, i) for i in range(len(fs))]))
        return m.blendshapes, m.presence
    from insightface.utils.face_align import arcface_dst

    mv, detector = Movement("cpu"), None
    blend, presence, crops, maps = [], [], [], []
    for i in range(len(fs)):
        img = read_image(fs, i)
        img = np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img
        if fs.framing == "raw":
            pts, detector = raw_points(fs, i, img, detector)
        else:
            pts = np.asarray(arcface_dst, np.float32)
        m = roi_from_points(pts[None])
        crops.append(crop_faces(np.ascontiguousarray(img)[None], m))
        maps.append(invert_affine(m))
        if len(crops) == batch_size or i == len(fs) - 1:
            out = mv(torch.cat(crops), np.concatenate(maps))
            blend.append(out.blendshapes)
            presence.append(out.presence)
            crops, maps = [], []
    return np.concatenate(blend), np.concatenate(presence)


def save_fusion(fusion: AUFusion, path: Path | str, metadata: dict) -> str:
    """Write `path` (.safetensors) and its .json record (version, inputs, fused AUs, `metadata`: training data, rule,
    scores); return the SHA-256."""
    import torch

    from affextract.movement import save_weights

    doc = {"version": fusion.version, "feature_names": list(INPUTS), "aus": list(AUS), "fused": list(fusion.fused),
           "clip_eps": {"cnn": CNN_EPS, "evidence": EVIDENCE_EPS}, "min_presence": MIN_PRESENCE, **metadata}
    return save_weights({"coef": torch.from_numpy(np.asarray(fusion.coef, np.float32))},
                        Path(path).with_suffix(".safetensors"), doc, half=False, fmt=FUSION_FORMAT)


def load_fusion(path: Path | str | None = None) -> AUFusion:
    """The fusion in `path` (None = the shipped au_fusion); refuses a file whose SHA-256 differs from its .json."""
    from affextract.movement import load_weights

    path = Path(path) if path is not None else FUSION_WEIGHTS
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: AU fusion parameters must be a .safetensors file (with its .json beside it)")
    state, doc = load_weights(path, FUSION_FORMAT, "refit it with `affextract train --fusion`")
    if tuple(doc.get("feature_names", ())) != INPUTS or tuple(doc.get("aus", ())) != AUS:
        raise ValueError(f"{path.with_suffix('.json')}: inputs or AUs differ from this affextract's {INPUTS}, {AUS}")
    return AUFusion(coef=state["coef"].numpy(), fused=tuple(doc["fused"]), version=int(doc["version"]),
                    sha256=doc["sha256"])


def au_source(fused: bool, path: Path | str | None = None) -> str:
    """The au_source a run records (CNN_SOURCE, or "fused:<version>:<SHA-256>" of the fusion file), read from the
    file's record without importing torch; load_fusion checks the file against it."""
    if not fused:
        return CNN_SOURCE
    path = Path(path) if path is not None else FUSION_WEIGHTS
    meta = path.with_suffix(".json")
    if not meta.is_file():
        raise FileNotFoundError(f"{meta}: no AU fusion record; pass another --fusion-weights or --cnn-aus")
    doc = json.loads(meta.read_text())
    if doc.get("format") != FUSION_FORMAT:
        raise ValueError(f"{meta}: not an AU fusion record (format {doc.get('format')!r})")
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
