"""Shared fixtures: tiny random timm models and calibration images."""

from __future__ import annotations

import os

import pytest
import timm
import torch

from quant import QuantConfig, quantize

# One thread: on a busy machine torch's default thread pool makes one tiny calibration take ~19 s
# instead of ~0.2 s (measured); results do not depend on it.
torch.set_num_threads(1)
# Nothing may be downloaded: a pretrained model that is not on disk fails at once, not after
# the hub client's retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every Ray node the tests start (ray.init, the nodes of a cluster, and those of subprocesses,
# which inherit this) listens on 127.0.0.1 only, never on the machine's network address.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

VIT_KWARGS = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
SWIN_KWARGS = dict(img_size=32, window_size=4, embed_dim=32, depths=(1, 1), num_heads=(2, 4),
                   num_classes=10)
# Fast searches for the tiny models; the defaults change nothing these tests check.
FAST = dict(search_points=10, search_rows=256)


def _make(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


@pytest.fixture(scope="session")
def tiny_vit() -> torch.nn.Module:
    return _make("vit_tiny_patch16_224", **VIT_KWARGS)


@pytest.fixture(scope="session")
def tiny_deit_distilled() -> torch.nn.Module:
    return _make("deit_tiny_distilled_patch16_224", **VIT_KWARGS)


# A Swin whose shifted windows matter: 64x64 inputs, two blocks per stage (rolls and masks),
# one PatchMerging. Random initialisation gives nearly uniform attention, where neither the
# position bias nor the masks would show: a bias table and queries and keys of a trained
# model's magnitude.
SHIFTED_SWIN = dict(img_size=64, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4,
                    num_classes=10)


def shifted_window_swin() -> torch.nn.Module:
    m = _make("swin_tiny_patch4_window7_224", **SHIFTED_SWIN)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0, 1)
            elif name.endswith("attn.qkv.weight"):
                p.mul_(4)
    return m


@pytest.fixture(scope="session")
def tiny_swin() -> torch.nn.Module:
    return _make("swin_tiny_patch4_window7_224", **SWIN_KWARGS)


@pytest.fixture(scope="session")
def images() -> torch.Tensor:
    return torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="session")
def models(tiny_vit, tiny_deit_distilled, tiny_swin) -> dict[str, torch.nn.Module]:
    return {"vit": tiny_vit, "deit": tiny_deit_distilled, "swin": tiny_swin}


@pytest.fixture(scope="session")
def quantized(models, images):
    """``quantized(model_name, **config)``: the model quantized with FAST searches, cached for
    the session (treat the result as read-only)."""
    cache: dict = {}

    def get(name: str, **config):
        key = (name, tuple(sorted(config.items())))
        if key not in cache:
            cache[key] = quantize(models[name], images, QuantConfig(**{**FAST, **config}))
        return cache[key]

    return get


@pytest.fixture
def service(tmp_path):
    """An API client and a dispatcher on a fresh SQLite store, with a local Ray (two CPUs)."""
    import ray
    from fastapi.testclient import TestClient

    from api.app import create_app
    from service.db import upgrade
    from service.dispatcher import Dispatcher
    from service.settings import Settings
    from service.store import Store

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    settings = Settings(database_url=url, data_dir=tmp_path, ray_workers=2)
    store = Store.from_url(url)
    yield TestClient(create_app(settings, store)), Dispatcher(store, settings, worker_id="t")
    store.engine.dispose()
