"""One rule for ranks and devices, for extraction, MMA training and seqhead."""

import pytest
import torch

from affextract.runtime import Ranks, ranks, resolve_device


def test_ranks_from_torchrun_environment(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert ranks() == Ranks(rank=3, world=4, local=1)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    assert ranks() == Ranks(rank=0, world=1, local=0)


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="not one of auto, cpu, cuda"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_a_gpu_asked_for_without_one_says_what_to_pass():
    with pytest.raises(ValueError, match="sees no CUDA GPU; use cpu"):
        resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_means_the_gpu_of_the_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count() - 1))
    assert resolve_device("cuda") == torch.device(f"cuda:{torch.cuda.device_count() - 1}")
    assert resolve_device("auto") == resolve_device("cuda")
