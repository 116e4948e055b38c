"""Real-size data paths: test and validation images streamed from an ImageFolder in batches
(never held whole), class-stratified seeded subsets named in the report."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from bench.imagefolder import FolderSpec, write_image_folder
from quant.evaluate import logits_of
from quant.stream import ImageStream, stratified_sample
from quant.zoo.data import digits_data, image_folder_data
from quant.zoo.models import load_model
from search.run import main

VIT_KWARGS = {"img_size": 32, "patch_size": 8, "num_classes": 10, "depth": 2}


def test_a_1000_image_sample_of_100_classes_takes_10_of_each():
    labels = torch.arange(100).repeat_interleave(100)  # an ImageFolder: sorted by class
    picked = stratified_sample(labels, 1000, seed=0)
    assert len(set(picked)) == 1000 and picked == sorted(picked)
    assert Counter(labels[picked].tolist()) == dict.fromkeys(range(100), 10)
    assert stratified_sample(labels, 1000, seed=0) == picked  # seeded
    assert stratified_sample(labels, 1000, seed=1) != picked
    # the first 1,000 samples would have covered 10 classes
    assert len(set(labels[:1000].tolist())) == 10


def test_stratified_sample_excludes_and_runs_out_gracefully():
    labels = torch.tensor([0] * 5 + [1] * 2 + [2] * 9)
    picked = stratified_sample(labels, 7, seed=3, exclude=[0, 1, 7])
    assert not {0, 1, 7} & set(picked)
    counts = Counter(labels[picked].tolist())
    # class 1 runs out after two rounds; the third round's one pick goes to class 0 or 2
    assert counts[1] == 2 and sorted([counts[0], counts[2]]) == [2, 3]
    assert len(stratified_sample(labels, 100, seed=0)) == 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("folder"),
                              FolderSpec(classes=5, train_per_class=8, val_per_class=6, size=40))


def test_image_folder_streams_test_and_validation_images(folder):
    model = load_model("vit_tiny_patch16_224", "random", **VIT_KWARGS).eval()
    data = image_folder_data(folder, model, calib_size=4, seed=0, limit=10, val_size=10,
                             workers=0)
    assert isinstance(data.x_test, ImageStream) and isinstance(data.x_val, ImageStream)
    assert Counter(data.y_test.tolist()) == dict.fromkeys(range(5), 2)
    assert Counter(data.x_val.labels.tolist()) == dict.fromkeys(range(5), 2)
    assert not set(data.val_ids) & set(data.calib_ids)
    whole = torch.stack([data.x_test.dataset[i][0] for i in data.x_test.ids])
    # batch by batch, in worker processes or not, the same logits as the images held whole
    streamed = logits_of(model, data.x_test)
    done: list[int] = []
    in_workers = logits_of(model, ImageStream(data.x_test.dataset, data.x_test.ids,
                                              data.y_test, batch_size=3, workers=2),
                           progress=done.append)
    assert torch.allclose(streamed, logits_of(model, whole), atol=1e-5)
    assert torch.allclose(in_workers, streamed, atol=1e-5)
    assert done == [3, 6, 9, 10]
    samples = data.samples()
    assert samples["test"] == {"images": 10, "ids_sha256": samples["test"]["ids_sha256"],
                               "subset": "class-stratified", "classes": 5, "per_class": [2, 2]}
    again = image_folder_data(folder, model, calib_size=4, seed=0, limit=10, val_size=10)
    assert again.samples() == samples  # the same seed names the same samples


def test_building_the_data_reads_no_test_or_validation_image(folder, monkeypatch):
    from torchvision.datasets import ImageFolder

    model = load_model("vit_tiny_patch16_224", "random", **VIT_KWARGS).eval()
    reads: list[str] = []
    original = ImageFolder.__getitem__

    def counting(self, i):
        reads.append(self.root)
        return original(self, i)

    monkeypatch.setattr(ImageFolder, "__getitem__", counting)
    data = image_folder_data(folder, model, calib_size=4, val_size=10, workers=0)
    assert len(reads) == 4  # the calibration images only
    assert len(data.x_test) == 30 and len(data.x_val) == 10


def test_digits_test_limit_is_class_stratified():
    data = digits_data(calib_size=8, test_limit=50)
    counts = Counter(data.y_test.tolist())
    assert len(counts) == 10 and set(counts.values()) == {5}
    assert data.samples()["test"]["subset"] == "class-stratified"
    assert digits_data(calib_size=8).samples()["test"]["subset"] == "all"


def test_search_run_on_a_folder_names_its_samples_and_says_what_none_did(folder, tmp_path,
                                                                         capsys):
    rc = main(["--data", str(folder), "--model", "vit_tiny_patch16_224", "--weights", "random",
               "--strategy", "none", "--calib-size", "4", "--val-size", "5", "--test-limit",
               "10", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["test_images"] == 10 and report["samples"]["test"]["images"] == 10
    assert report["samples"]["validation"]["images"] == 5
    search = report["result"]["search"]
    assert search["met_budget"] and search["stopped_by"] == "single_configuration"
    out = capsys.readouterr().out
    assert "one configuration calibrated and measured" in out and "budget" not in out.split(
        "one configuration")[0]


def test_a_stop_during_the_test_evaluation_ends_it_at_the_next_batch(tmp_path):
    from search.strategies import SearchCancelled
    from workers.jobs import JobHooks, JobInputs, run_job

    stages: list[tuple[int, str]] = []
    hooks = JobHooks(progress=lambda done, total, stage: stages.append((done, stage)),
                     cancelled=lambda: any(s.startswith("test images") for _, s in stages))
    inputs = JobInputs(calib_size=8, val_size=8, plots=False)
    with pytest.raises(SearchCancelled, match="evaluating the test split"):
        run_job(inputs, tmp_path, hooks)
    tested = [d for d, s in stages if s.startswith("test images")]
    assert tested == [256]  # the first batch of 360 images, then it stopped
    assert not list(tmp_path.glob("*.safetensors"))
