"""The GPU check's own logic (tools/bench_gpu.py); its numbers come from a GPU machine, never from tests."""

import torch

from tools import bench_gpu


def test_busy_fraction_is_the_mean_of_nvidia_smis_percentages():
    assert bench_gpu.busy_fraction("100\n50\n 90\n[N/A]\n") == 0.8
    assert bench_gpu.busy_fraction("") is None
    assert bench_gpu.busy_fraction("[N/A]\n") is None


def test_without_nvidia_smi_the_busy_fraction_says_why(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with bench_gpu.BusySampler() as busy:
        pass
    assert busy.fraction is None and busy.why == "no nvidia-smi on PATH"


def test_without_cuda_the_check_says_it_is_skipped(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    [line] = bench_gpu.lines()
    assert line.startswith("skipped: no CUDA device")
