"""Backend choice (restorenet/ops/_backend.py): argument > use_backend > RESTORENET_BACKEND > fastest."""
import types

import pytest
import torch

from restorenet.ops import _backend
from restorenet.ops._backend import available_backends, resolve_backend, use_backend

CUDA = torch.device("cuda")


def test_backend_selection_precedence(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("RESTORENET_BACKEND", raising=False)
    assert resolve_backend(None, cpu, "op") == "reference"
    monkeypatch.setenv("RESTORENET_BACKEND", "reference")
    assert resolve_backend(None, cpu, "op") == "reference"
    monkeypatch.setenv("RESTORENET_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="RESTORENET_BACKEND"):
        resolve_backend(None, cpu, "op")
    with use_backend("reference"):  # the context beats the environment
        assert resolve_backend(None, cpu, "op") == "reference"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("fast", cpu, "op")
    with pytest.raises(RuntimeError, match="cuda"):
        resolve_backend("cuda", cpu, "hyper_conv2d")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        resolve_backend("triton", torch.device("cpu"), "hyper_conv2d")


@pytest.fixture
def fake_extension(monkeypatch):
    """A compiled extension that carries only hyper_conv2d's kernels."""
    ext = types.SimpleNamespace(hyper_conv2d_forward=lambda *a: None)
    monkeypatch.setattr(_backend, "cuda_extension", lambda: ext)
    monkeypatch.delenv("RESTORENET_BACKEND", raising=False)
    return ext


def test_cuda_counts_only_for_ops_the_extension_carries(fake_extension):
    assert "cuda" in available_backends(CUDA, "hyper_conv2d_forward")
    assert "cuda" not in available_backends(CUDA, "slim_conv2d_forward")
    assert resolve_backend(None, CUDA, "hyper_conv2d", "hyper_conv2d_forward") == "cuda"
    # The automatic choice falls back to the next backend ...
    assert resolve_backend(None, CUDA, "slim_conv2d", "slim_conv2d_forward") in ("triton", "reference")
    # ... and asking for the missing one says which function is missing.
    with pytest.raises(RuntimeError, match="slim_conv2d_forward"):
        resolve_backend("cuda", CUDA, "slim_conv2d", "slim_conv2d_forward")


def test_use_backend_validates_and_nests():
    with pytest.raises(ValueError, match="name must be one of"):
        with use_backend("fastest"):
            pass
    with use_backend("reference"):
        with use_backend("triton"):
            assert _backend._override[-1] == "triton"
        assert _backend._override[-1] == "reference"
    assert not _backend._override
