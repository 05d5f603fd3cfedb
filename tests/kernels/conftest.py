"""Kernel test fixtures: which path runs the op under test, and skipping CUDA-only tests without a GPU."""
import pytest
import torch

from megaswift.kernels import _dispatch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run tests/gpu/run.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["csrc", "reference"])
def kernel_path(request, monkeypatch):
    """Runs a test once through the compiled op and once through the torch fallback."""
    if request.param == "csrc":
        if _dispatch.why_not_compiled("loss_scaled_cross_entropy", "cpu") is not None:
            pytest.skip(f"csrc not built: {_dispatch.why_not_compiled('loss_scaled_cross_entropy', 'cpu')}")
    else:
        monkeypatch.setattr(_dispatch, "why_not_compiled", lambda op, device: "forced by the test")
    return request.param
