"""``quantize``: the library's entry point, and the module it returns."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import timm
import torch
from torch import Tensor, nn

from .adapters import find_adapter
from .calibrate import (
    Progress,
    calibrate_modules,
    calibrate_parameters,
    collect_statistics,
    release_statistics,
    round_float_parameters,
    tensor_digest,
)
from .config import QuantConfig
from .factory import QuantizerFactory, apply_overrides
from .metrics import sqnr_db
from .quantizers import Quantizer


class QuantizedModel(nn.Module):
    """A model's fully (or partially) quantized twin, plus the recipe that made it."""

    def __init__(self, model: nn.Module, config: QuantConfig, architecture: dict,
                 info: dict | None = None) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.architecture = architecture
        self.info = dict(info or {})
        self.metrics: dict = {}

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def quantizers(self) -> Iterator[tuple[str, Quantizer]]:
        for name, m in self.model.named_modules():
            if isinstance(m, Quantizer):
                yield name, m

    def layer_report(self) -> dict[str, dict]:
        """Per-quantizer configuration, JSON-ready."""
        return {n: {"kind": q.kind, "enabled": q.enabled, **q.describe()}
                for n, q in self.quantizers() if bool(q.calibrated)}

    @contextmanager
    def probe_sqnr(self) -> Iterator[Callable[[], dict[str, float]]]:
        """Measure signal-to-quantization-noise ratio (dB) per tensor kind over the forward passes
        run inside the block: ``with q.probe_sqnr() as read: q(x); print(read())``."""
        qs = [q for _, q in self.quantizers() if q.enabled and bool(q.calibrated)]
        probes = [(q.kind, {"signal": 0.0, "noise": 0.0}) for q in qs]
        for q, (_, probe) in zip(qs, probes, strict=True):
            q.probe = probe

        def read() -> dict[str, float]:
            acc: dict[str, list[float]] = {}
            for kind, probe in probes:
                if probe["signal"] == 0 and probe["noise"] == 0:
                    continue  # never ran in forward (parameters quantized once, in place)
                a = acc.setdefault(kind, [0.0, 0.0])
                a[0] += probe["signal"]
                a[1] += probe["noise"]
            return {k: sqnr_db(s, n) for k, (s, n) in acc.items()}

        try:
            yield read
        finally:
            for q in qs:
                q.probe = None


def _check_images(images: Tensor) -> None:
    if not torch.is_tensor(images):
        raise TypeError(f"calib_images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError("calib_images must be a float tensor of shape (N, C, H, W), got "
                         f"{images.dtype} of shape {tuple(images.shape)}")
    if images.shape[0] < 1:
        raise ValueError("calib_images is empty")
    if not torch.isfinite(images).all():
        raise ValueError("calib_images contains NaN or infinite values")


def quantize(model: nn.Module, calib_images: Tensor, config: QuantConfig | None = None,
             progress: Progress | None = None) -> QuantizedModel:
    """Rewrite ``model`` into its quantized twin and calibrate it on ``calib_images`` (the first
    ``config.calib_size`` of them, already normalised for the model). ``model`` is not changed."""
    config = config or QuantConfig()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_images(calib_images)
    adapter = find_adapter(model)
    architecture = adapter.architecture(model)
    device = next(model.parameters()).device
    # Quantizers are born on the CPU: move the whole twin to the model's device.
    twin = adapter.rewrite(copy.deepcopy(model).eval(), QuantizerFactory(config))
    apply_overrides(twin, config)
    twin = twin.to(device)
    images = calib_images[: config.calib_size].to(device)
    start = time.perf_counter()
    try:
        collect_statistics(twin, images, config)
        calibrate_modules(twin, config, progress)
        calibrate_parameters(twin, config)
        round_float_parameters(twin)
    finally:
        release_statistics(twin)
    info = {
        "calib_seconds": round(time.perf_counter() - start, 3),
        "calib_images": int(images.shape[0]),
        "calib_digest": tensor_digest(images),
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
    }
    return QuantizedModel(twin, config, architecture, info).eval()
