"""The MFU peak: train.peak_tflops, else the datasheet value of a known CUDA device; none on a CPU."""

import pytest
import torch

from lotus_dist.train.config import ConfigError, load_config
from lotus_dist.train.throughput import datasheet_tflops, mfu, peak_flops


@pytest.mark.parametrize("name, key, tflops", [
    ("NVIDIA H100 80GB HBM3", "H100", 989.0), ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", "H100 NVL", 835.0), ("NVIDIA H200", "H200", 989.0), ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
    ("NVIDIA L40S", "L40S", 362.0), ("NVIDIA GeForce RTX 4090", "RTX 4090", 165.0), ("NVIDIA B200", "B200", 2250.0)])
def test_datasheet_peaks_by_device_name(name, key, tflops):
    assert datasheet_tflops(name) == (key, tflops)


def test_no_peak_on_a_cpu_unless_given():
    assert datasheet_tflops("Tesla K80") is None
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), 2.5) == 2.5e12
    # 1e9 FLOPs per token x 1000 tokens in 2 s on 2 devices of 1 TFLOP/s each: 25 %
    assert mfu(1e9, 1000, 2.0, 2, 1e12) == pytest.approx(0.25)


def test_a_peak_that_is_not_positive_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^config key 'train.peak_tflops' must be positive \(or null\), got 0.0$"):
        load_config(None, ["train.peak_tflops=0"])
    assert load_config(None, ["train.compile=true"]).train.compile is True
