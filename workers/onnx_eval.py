"""The deployable model of a job as ONNX, run in ONNX Runtime (CPU) on the test split the
simulator was measured on: an integer-setting job's integer program (``export.export_onnx``,
bit-identical to the engine), any other job's fast QDQ graph (``form="qdq"``: the same
quantizers with float LayerNorm/Softmax/GELU, as its simulation computes them).

Images go through in batches, as ``quant.evaluate.logits_of`` runs the simulator; texts give
their embeddings from ``last_hidden_state`` exactly as ``quant.text.embeddings_of`` does for the
simulator (batches of one length, mean over the real tokens, L2-normalised): ``OnnxModule``
wraps the session as a module so those very functions run it. The metrics are the simulator's
(``compare`` / ``compare_embeddings`` against the same FP32 outputs), plus whether ONNX
Runtime's outputs equal the simulator's bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from quant.evaluate import compare, logits_of
from quant.inputs import is_text
from quant.text import compare_embeddings, embeddings_of

MEDIA_TYPE = "application/octet-stream"


def unavailable(setting: str, why: str) -> dict:
    """``result["onnx"]`` of a job whose model has no ONNX form (``why``: the exporter's
    message)."""
    return {"available": False,
            "reason": f"no ONNX model for this {setting!r}-setting job: {why} (the integer "
                      "setting, quant.setting \"integer\", exports every supported family)"}


class OnnxModule(nn.Module):
    """An ONNX Runtime session called like the quantized model: ``m(images)`` -> logits,
    ``m(input_ids=..., attention_mask=..., token_type_ids=...)`` -> last hidden state."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        super().__init__()
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._device = nn.Parameter(torch.empty(0), requires_grad=False)  # for .parameters()

    def forward(self, images: Tensor | None = None, **tokens: Tensor) -> Tensor:
        if images is not None:
            feed = {"images": images.detach().cpu().float().numpy()}
        else:
            ref = tokens["input_ids"]
            feed = {n: (tokens[n] if n in tokens else torch.zeros_like(ref)).cpu().long().numpy()
                    for n in self.input_names}
        (out,) = self.session.run(None, feed)
        return torch.from_numpy(np.ascontiguousarray(out))


def evaluate_onnx(path: str | Path, x_test, y_test: Tensor | None, fp32: Tensor,
                  simulator: Tensor, form: str = "integer", progress=None) -> dict:
    """ONNX Runtime's metrics on the test split. ``fp32`` and ``simulator``: the FP32 model's
    and the simulator's logits (images) or sentence embeddings (texts) on the same inputs."""
    ort_model = OnnxModule(path)
    if is_text(x_test):
        got = embeddings_of(ort_model, x_test)
        metrics = compare_embeddings(fp32, got).to_dict()
    else:
        got = logits_of(ort_model, x_test, progress=progress)
        metrics = compare(fp32, got, y_test).to_dict()
    import onnxruntime as ort

    if is_text(x_test):  # how close ONNX Runtime stays to the simulator the search scored
        closeness = {"cosine_to_simulator": round(float(
            torch.nn.functional.cosine_similarity(got, simulator, dim=-1).mean()), 6)}
    else:
        closeness = {"agreement_with_simulator": round(float(
            (got.argmax(-1) == simulator.argmax(-1)).float().mean()), 6)}
    return {"available": True, "runtime": f"onnxruntime {ort.__version__} (CPU)", "form": form,
            **metrics, "bit_identical_to_engine": bool(torch.equal(got, simulator)), **closeness,
            "size_bytes": Path(path).stat().st_size}
