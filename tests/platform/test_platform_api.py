"""device() / dist_backend() and apply_cpu_patches() on a machine that has CUDA (faked)."""
import torch

import megaswift.platform as platform
from megaswift.platform import cpu


def test_cpu_machine_uses_cpu_and_gloo(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert platform.device() == torch.device("cpu")
    assert platform.dist_backend() == "gloo"


def test_gpu_machine_uses_cuda_and_nccl(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert platform.device() == torch.device("cuda", 3)
    assert platform.dist_backend() == "nccl"


def test_apply_does_nothing_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = cpu.applied_patches()
    assert cpu.apply_cpu_patches() is False
    assert cpu.applied_patches() == before
