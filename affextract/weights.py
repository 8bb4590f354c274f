"""Weights files: tensors in a .safetensors file plus a .json record beside it ({format, sha256, ...}).

One writer and one reader for every such file (the MMA, the converted MediaPipe models, the AU fusion): the record
names the file's format and the SHA-256 of the .safetensors, and the reader refuses a file whose bytes do not match
it. Nothing is ever unpickled. What each format records beyond that (architecture, provenance, licence) is up to the
module that owns it (model.py, movement.py, fusion.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SUFFIX = ".safetensors"


def file_sha256(path: Path | str) -> str:
    """SHA-256 of a file, read in 1 MiB pieces (weights files are checked against it before they are loaded)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_file(path: Path, write: Callable[[Path], None], mode: int | None = None) -> None:
    """Write through a temporary file in the same folder and rename it over `path` (atomic on POSIX), so a reader
    sees the old file or the new one, never half of one. `mode` None: the mode any new file gets here (0644 under the
    usual umask; safetensors writes its files 0600)."""
    tmp = path.with_name(f".{path.name}.partial")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask() if mode is None else mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def weights_path(path: Path | str, what: str, remake: str = "") -> Path:
    """`path` as a weights file that exists; `what` names it in the errors ("MMA weights", "AU fusion parameters"),
    `remake` (when given) says how to get a good one."""
    path = Path(path)
    if path.suffix != SUFFIX:
        raise ValueError(f"{path}: {what} must be a {SUFFIX} file with its .json record beside it (pickled "
                         "checkpoints are not loaded)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file" + (f"; {remake}" if remake else ""))
    return path


def write_weights(tensors: dict[str, torch.Tensor], path: Path | str, fmt: str, record: dict,
                  half: bool = False) -> str:
    """Write `path` (.safetensors) and its .json record {"format": fmt, "sha256": ..., **record}; return the SHA-256.

    Floating tensors are stored fp16 when `half` (halves the file; the reader casts back), else fp32; others as they
    are. Both files are replaced atomically and made readable by all (0644), like the package's other data."""
    from safetensors.torch import save_file

    path = Path(path).with_suffix(SUFFIX)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in tensors.items():
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.half() if half else v.float()
        state[k] = v.contiguous()
    replace_file(path, lambda p: save_file(state, str(p), metadata={"format": fmt}), 0o644)
    digest = file_sha256(path)
    doc = json.dumps({"format": fmt, "sha256": digest, **record}, indent=2, default=str) + "\n"
    replace_file(path.with_suffix(".json"), lambda p: p.write_text(doc), 0o644)
    return digest


def read_record(path: Path | str, fmt: str, remake: str, fields: tuple[str, ...] = ()) -> dict:
    """The .json record beside weights file `path`, checked to be of format `fmt` and to hold `fields` (besides
    sha256); the file's bytes are not checked here (read_weights does). Needs no torch. `remake` says how the file
    is made again, for the errors."""
    meta = Path(path).with_suffix(".json")
    if not meta.is_file():
        raise FileNotFoundError(f"{meta}: the .json record of {Path(path).name} (format, SHA-256) is missing; {remake}")
    try:
        doc = json.loads(meta.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta}: not readable as JSON ({e}); {remake}") from None
    missing = [k for k in ("sha256", *fields) if k not in doc] if isinstance(doc, dict) else ["format"]
    if missing or doc.get("format") != fmt:
        found = doc.get("format") if isinstance(doc, dict) else None
        raise ValueError(f"{meta}: not a record of {fmt} weights (format {found!r}, missing {missing}); {remake}")
    return doc


def read_weights(path: Path | str, fmt: str, what: str, remake: str,
                 fields: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, record) of a file written by write_weights with format `fmt`: floating tensors as fp32 on the CPU.
    Refuses a file that is not .safetensors, has no record of that format, or whose SHA-256 differs from the one
    recorded. `what` names the file in the errors, `remake` says how to get a good one."""
    from safetensors.torch import load_file

    path = weights_path(path, what, remake)
    doc = read_record(path, fmt, remake, fields)
    digest = file_sha256(path)
    if digest != doc["sha256"]:
        raise ValueError(f"{path}: SHA-256 {digest} does not match {doc['sha256']} recorded in "
                         f"{path.with_suffix('.json').name}; the file is corrupt or was replaced. {remake[0].upper()}"
                         f"{remake[1:]}.")
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    return tensors, doc
