"""The one reader of weights files (affextract.weights): every shipped file loads through it, and a file whose bytes
differ from its record is refused, naming the file."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from affextract.schema import WEIGHTS_DIR
from affextract.weights import read_record, read_weights, write_weights

SHIPPED = sorted(p.stem for p in WEIGHTS_DIR.glob("*.safetensors"))


@pytest.mark.parametrize("stem", SHIPPED)
def test_every_shipped_file_loads_and_a_flipped_byte_is_refused(stem, tmp_path):
    doc = json.loads((WEIGHTS_DIR / f"{stem}.json").read_text())
    tensors, record = read_weights(WEIGHTS_DIR / f"{stem}.safetensors", doc["format"], "weights", "reinstall")
    assert record == doc and tensors and all(t.dtype != torch.float16 for t in tensors.values())
    copy = tmp_path / f"{stem}.safetensors"
    shutil.copy(WEIGHTS_DIR / f"{stem}.json", copy.with_suffix(".json"))
    data = bytearray((WEIGHTS_DIR / f"{stem}.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside the tensor data
    copy.write_bytes(bytes(data))
    refused = re.escape(f"{copy}: SHA-256 ") + f".* does not match .* recorded in {stem}.json"
    with pytest.raises(ValueError, match=refused):
        read_weights(copy, doc["format"], "weights", "reinstall")


def test_writer_records_format_and_digest_and_reader_refuses_the_wrong_ones(tmp_path):
    path = tmp_path / "w.safetensors"
    digest = write_weights({"a": torch.ones(3, dtype=torch.float64), "n": torch.arange(2)}, path, "fmt-a",
                           {"note": "test"}, half=True)
    assert json.loads(path.with_suffix(".json").read_text()) == {"format": "fmt-a", "sha256": digest, "note": "test"}
    assert (path.stat().st_mode & 0o777) == (path.with_suffix(".json").stat().st_mode & 0o777) == 0o644
    assert not list(tmp_path.glob(".*partial"))
    tensors, _ = read_weights(path, "fmt-a", "weights", "rewrite it")
    assert tensors["a"].dtype == torch.float32 and tensors["n"].dtype == torch.int64  # fp16 on disk, fp32 back
    with pytest.raises(ValueError, match="w.json: not a record of fmt-b weights.*rewrite it"):
        read_weights(path, "fmt-b", "weights", "rewrite it")
    with pytest.raises(ValueError, match="must be a .safetensors file"):
        read_weights(tmp_path / "w.pt", "fmt-a", "test weights", "rewrite it")
    path.with_suffix(".json").write_text("{not json")
    with pytest.raises(ValueError, match="w.json: not readable as JSON"):
        read_record(path, "fmt-a", "rewrite it")
    path.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match="w.json: the .json record of w.safetensors .* is missing; rewrite it"):
        read_weights(path, "fmt-a", "weights", "rewrite it")
