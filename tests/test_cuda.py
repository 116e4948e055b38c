"""Calibration on CUDA (skipped where there is no GPU; run on a lent GPU machine)."""

import copy

import pytest
import torch
from conftest import FAST

from quant import QuantConfig, load_quantized, quantize, save_quantized

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("method", ["tsptq", "uniform", "twin", "ptf"])
def test_calibration_runs_on_cuda(tiny_vit, images, method, tmp_path):
    model = copy.deepcopy(tiny_vit).cuda()
    q = quantize(model, images.cuda(), QuantConfig(method=method, **FAST))
    assert all(t.is_cuda for t in [*q.parameters(), *q.buffers()])
    with torch.no_grad():
        y = q(images.cuda())
        y_cpu = quantize(tiny_vit, images, QuantConfig(method=method, **FAST))(images)
    assert y.is_cuda
    cos = torch.nn.functional.cosine_similarity(y.cpu().flatten(), y_cpu.flatten(), dim=0)
    assert cos > 0.99  # same method on another device: float sums differ, parameters may too
    path = save_quantized(q, tmp_path / "q.safetensors")
    loaded = load_quantized(path, device="cuda")
    with torch.no_grad():
        assert torch.equal(loaded(images.cuda()), y)
