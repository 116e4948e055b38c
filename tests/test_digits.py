"""The bundled digits ViT: trained weights, its split, and the 8-bit checkpoint budget."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from quant import QuantConfig, load_quantized, quantize, read_recipe, save_quantized
from quant.evaluate import compare, logits_of
from quant.zoo.data import digits_data, pick_calibration
from quant.zoo.digits import load_digits_split


@pytest.fixture(scope="module")
def digits():
    return timm.create_model("digits_vit", pretrained=True).eval(), digits_data()


def test_split_is_fixed_and_stratified():
    a, b = load_digits_split(), load_digits_split()
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    assert (len(a.y_train), len(a.y_test)) == (1437, 360)
    assert a.x_train.shape[1:] == (3, 32, 32)
    assert torch.bincount(a.y_test, minlength=10).min() >= 35  # every class in the test split
    assert pick_calibration(1437, 32, 0) == pick_calibration(1437, 32, 0)
    assert pick_calibration(1437, 32, 0) != pick_calibration(1437, 32, 1)


def test_trained_weights_reach_97_percent(digits):
    model, data = digits
    top1 = (logits_of(model, data.x_test).argmax(-1) == data.y_test).float().mean()
    assert top1 >= 0.97


def test_w8a8_checkpoint_budget_and_exact_reload(digits, tmp_path):
    model, data = digits
    qmodel = quantize(model, data.calib, QuantConfig(method="tsptq", w_bits=8, a_bits=8))
    fp_path = tmp_path / "fp32.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fp_path))
    result = compare(logits_of(model, data.x_test), logits_of(qmodel, data.x_test), data.y_test)
    path = save_quantized(qmodel, tmp_path / "q.safetensors", metrics=result.to_dict())
    assert path.stat().st_size <= 0.27 * fp_path.stat().st_size
    assert result.agreement >= 0.99
    loaded = load_quantized(path)
    q_logits = logits_of(loaded, data.x_test)
    assert torch.equal(q_logits, logits_of(qmodel, data.x_test))
    assert read_recipe(path)["metrics"]["top1"] == result.top1
    assert read_recipe(path)["architecture"]["name"] == "digits_vit"


def test_validation_images_are_disjoint_from_calibration():
    from quant.zoo.data import pick_validation

    data = digits_data(32, 0, val_size=256)
    assert data.x_val.shape == (256, 3, 32, 32)
    val_ids = pick_validation(1437, data.calib_ids, 256, 0)
    assert not set(val_ids) & set(data.calib_ids)
    split = load_digits_split()
    assert torch.equal(data.x_val, split.x_train[val_ids])
