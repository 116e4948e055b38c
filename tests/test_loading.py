"""Loading code that the benchmark and the service use, on files the tests make."""

import pickle

import numpy as np
import pytest
import timm
import torch
from conftest import FAST, VIT_KWARGS
from PIL import Image
from safetensors.torch import save_file

from quant import QuantConfig, quantize
from quant.zoo.data import image_folder_data
from quant.zoo.models import load_model
from service.cli import main as cli


def test_load_model_from_local_safetensors(tmp_path):
    src = timm.create_model("vit_tiny_patch16_224", **VIT_KWARGS)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model = load_model("vit_tiny_patch16_224", path, **VIT_KWARGS)
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_load_model_from_torch_file_never_unpickles(tmp_path):
    src = timm.create_model("vit_tiny_patch16_224", **VIT_KWARGS)
    good = tmp_path / "w.pth"
    torch.save(src.state_dict(), good)
    model = load_model("vit_tiny_patch16_224", good, **VIT_KWARGS)
    assert torch.equal(model.pos_embed, src.pos_embed)

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"x": Payload()}))
    with pytest.raises(ValueError, match="cannot load weights"):
        load_model("vit_tiny_patch16_224", evil, **VIT_KWARGS)
    assert not marker.exists()


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown timm model"):
        load_model("no_such_model")
    with pytest.raises(FileNotFoundError):
        load_model("vit_tiny_patch16_224", tmp_path / "missing.safetensors")
    wrong = tmp_path / "wrong.safetensors"
    save_file({"a": torch.zeros(2)}, str(wrong))
    with pytest.raises(ValueError, match="cannot load weights"):
        load_model("vit_tiny_patch16_224", wrong, **VIT_KWARGS)


def test_digits_vit_pretrained_is_the_bundled_file():
    a, b = load_model("digits_vit"), load_model("digits_vit", "random")
    assert not torch.equal(a.head.weight, b.head.weight)
    assert torch.equal(a.head.weight, timm.create_model("digits_vit", pretrained=True).head.weight)


def _image_folder(root, per_class=3):
    rng = np.random.default_rng(0)
    for part in ("train", "val"):
        for cls in ("cat", "dog"):
            (root / part / cls).mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / part / cls / f"{i}.png")


def test_image_folder_data(tmp_path):
    _image_folder(tmp_path)
    model = load_model("vit_tiny_patch16_224", "random", **VIT_KWARGS)
    data = image_folder_data(tmp_path, model, calib_size=4, seed=0)
    assert data.calib.shape == (4, 3, 32, 32)
    assert len(data.x_test) == 6 and data.x_test.head(6).shape == (6, 3, 32, 32)
    assert sorted(data.y_test.tolist()) == [0, 0, 0, 1, 1, 1]
    qmodel = quantize(model, data.calib, QuantConfig(**FAST))
    assert qmodel(data.x_test.head(6)).shape == (6, 10)
    with pytest.raises(FileNotFoundError, match="ImageFolder"):
        image_folder_data(tmp_path / "train", model)


def test_cli_quantize_end_to_end(tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    assert cli(["quantize", "--methods", "tsptq", "--widths", "8/8", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tsptq" in text and "reproduces the calibrated one exactly: True" in text
    assert out.stat().st_size > 0


def test_cli_usage_errors(capsys):
    assert cli(["quantize", "--methods", "nope"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert cli(["quantize", "--model", "no_such_model"]) == 2
    with pytest.raises(SystemExit) as e:
        cli(["quantize", "--widths", "8x8"])
    assert e.value.code == 2
