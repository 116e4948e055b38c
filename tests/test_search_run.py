"""``python -m search.run`` end to end: report, checkpoint and plots; ImageFolder data; clear
errors for bad options."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from test_loading import _image_folder

from search.run import main

SMALL = ["--calib-size", "8", "--val-size", "32"]


def test_threshold_search_writes_report_checkpoint_and_plots(tmp_path):
    out = tmp_path / "out"
    rc = main(["--strategy", "thresholds", "--max-candidates", "4", "--workers", "1",
               "--json", str(tmp_path / "r.json"), "--out", str(out), *SMALL])
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["strategy"] == "thresholds"
    search = report["result"]["search"]
    assert search["evaluations"] == 4 and search["stopped_by"] == "max_candidates"
    assert "max_candidates" in search["message"]
    assert report["pareto_front"] and report["timings"]["search_s"] >= 0
    assert report["validation_images"] == 32 and len(report["calibration_sample_ids"]) == 8
    assert 0.9 < report["result"]["top1"] <= 1
    assert (out / "digits_vit_tsptq_w8a8.safetensors").is_file()
    plots = {p.name for p in (out / "plots").glob("*.png")}
    assert "pareto_front.png" in plots
    # Every V-2SF (post-Softmax, post-GELU) and O-2SF (LayerNorm input) quantizer has one.
    assert {"hist_blocks.0.attn.a_q.png", "hist_blocks.0.mlp.fc2.input_q.png",
            "hist_blocks.0.norm1.input_q.png", "hist_fc_norm.input_q.png"} <= plots
    with Image.open(out / "plots" / "hist_blocks.0.attn.a_q.png") as im:
        assert im.size[0] > 300


def test_image_folder_data_and_strategy_none(tmp_path, capsys):
    _image_folder(tmp_path / "images", per_class=12)
    rc = main(["--data", str(tmp_path / "images"), "--strategy", "none", "--calib-size", "4",
               "--val-size", "8", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["test_images"] == 24 and report["validation_images"] == 8
    assert "test top-1" in capsys.readouterr().out


def test_test_limit_keeps_a_fixed_subset(tmp_path, capsys):
    rc = main(["--strategy", "none", "--calib-size", "8", "--val-size", "8", "--test-limit",
               "50", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["test_images"] == 50 and report["inputs"] == "images"


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "--workers must be at least 1"),
    (["--max-candidates", "0"], "--max-candidates must be at least 1"),
    (["--test-limit", "0"], "--test-limit must be at least 1"),
    (["--data", "/nonexistent/dir", "--strategy", "none"], "is not a directory"),
])
def test_bad_options_exit_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_an_unreachable_ray_cluster_is_a_clear_error(tmp_path):
    """``RAY_ADDRESS`` naming a port nothing listens on: a message and exit 2 at once."""
    import os
    import subprocess
    import sys

    from service.demo import free_port

    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{free_port()}"}
    proc = subprocess.run([sys.executable, "-m", "search.run", "--strategy", "thresholds",
                           "--max-candidates", "2", *SMALL], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "is unreachable" in proc.stderr and "Traceback" not in proc.stderr
