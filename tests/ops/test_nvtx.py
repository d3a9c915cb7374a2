"""Op ranges (restorenet/ops/_nvtx.py): NVTX for Nsight, record_function for torch.profiler."""
import torch


def test_nvtx_ranges_are_named(monkeypatch):
    from restorenet.ops._nvtx import nvtx_range

    seen = []
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: seen.append(name))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: seen.append("pop"))
    with nvtx_range("hyper_conv2d", "fwd", torch.device("cuda")):
        pass
    with nvtx_range("hyper_conv2d", "bwd", torch.device("cpu")):  # no-op off CUDA
        pass
    assert seen == ["restorenet::hyper_conv2d::fwd", "pop"]

