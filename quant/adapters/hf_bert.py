"""Hugging Face BERT-style encoders (``transformers`` ``BertModel``; all-MiniLM-L6-v2 is one).

A BERT layer has a ViT block's parts in another order (LayerNorm after each residual sum, not
before), so the fully quantized twin of METHOD.md section 2 maps one to one: query, key and
value (fused into one Linear, as timm's qkv, so their shared input is quantized once), the
attention output projection, the intermediate (fc1) and output (fc2) Linears on weights and
inputs; both attention matmuls (A under V-2SF); post-GELU under V-2SF; every LayerNorm input,
the residual stream where the outlier channels live, under O-2SF. The three embedding lookup
tables are held as 8-bit integers with one scale per row (a row is what a lookup reads), like a
ViT's position embeddings; their sum is the first LayerNorm's input, quantized like the others.

Calibration takes a mapping of token tensors. Padding tokens enter no statistic
(``Capture.token_mask``), and the Hessian-guided metric's pseudo-label loss is the
cross-entropy of each calibration text's nearest neighbour among the others under FP32
(``quant.text``): the analogue of an image's top-1, read from the embeddings the encoder exists
to produce.

``transformers`` is imported only when a model from it is met, so the timm families never pay
for it.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from ..calibrate import attach_param_quantizers, pseudo_label_loss
from ..factory import QuantizerFactory
from ..inputs import Inputs, check_text, is_text
from ..modules import QSelfAttention, UnsupportedModelError, gelu_pair
from ..text import retrieval_logits, sentence_embeddings
from .base import ModelAdapter, _replace_children, check_fully_rewritten, plain_twin, qlinear

_BERT = "transformers.models.bert.modeling_bert"
TABLES = ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
          "embeddings.token_type_embeddings.weight")
# Machine- or version-specific config entries that do not describe the architecture.
_VOLATILE = ("_name_or_path", "transformers_version", "architectures")


def _gelu(act: nn.Module) -> bool:
    """GELU in any of its exact or tanh forms: V-2SF's signed grid relies on its minimum."""
    return isinstance(act, nn.GELU) or "GELU" in type(act).__name__


def _fuse(*linears: nn.Linear) -> nn.Linear:
    """One Linear computing ``linears`` side by side (query, key, value → timm's qkv)."""
    first = linears[0]
    if any(type(m) is not nn.Linear or m.in_features != first.in_features
           or (m.bias is None) != (first.bias is None) for m in linears):
        raise UnsupportedModelError("query, key and value must be plain Linears alike")
    fused = nn.Linear(first.in_features, sum(m.out_features for m in linears),
                      bias=first.bias is not None, device=first.weight.device,
                      dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in linears]))
        if first.bias is not None:
            fused.bias.copy_(torch.cat([m.bias for m in linears]))
    return fused


class HFBertAdapter(ModelAdapter):
    family = "hf_bert"
    post_ln_two_scale = True  # see QuantConfig.post_ln_two_scale
    keep_bulk = True  # see QuantConfig.keep_bulk
    first_token_scale = True  # see QuantConfig.first_token_scale
    # Validation's tie-break chose coarse_offset on; off until the fast ONNX graph keeps it
    # padding-invariant (see QuantConfig.coarse_offset).
    fixed_first_token = True  # [CLS]

    def matches(self, model: nn.Module) -> bool:
        bert = sys.modules.get(_BERT)  # a BertModel exists only once its module is imported
        return bert is not None and isinstance(model, bert.BertModel)

    def check_inputs(self, inputs: Inputs) -> None:
        if not is_text(inputs):
            raise TypeError("a text encoder is calibrated on a mapping of token tensors "
                            "(input_ids, attention_mask, token_type_ids), got "
                            f"{type(inputs).__name__}")
        check_text(inputs)

    def task_loss(self, model: nn.Module, inputs: Inputs) -> Tensor:
        """Each calibration text's nearest neighbour among the others under FP32 is its
        pseudo-label (the analogue of an image's top-1); padding enters no embedding."""
        return pseudo_label_loss(model, inputs, lambda m, x: retrieval_logits(
            sentence_embeddings(m, x)))

    def versions(self) -> dict[str, str]:
        import transformers

        return {"transformers_version": transformers.__version__}

    def rewrite(self, model: nn.Module, factory: QuantizerFactory) -> nn.Module:
        from transformers.models.bert import modeling_bert as mb

        cfg = model.config
        if cfg.is_decoder or cfg.add_cross_attention:
            raise UnsupportedModelError("BERT decoders and cross-attention are not supported")
        if getattr(cfg, "position_embedding_type", "absolute") != "absolute":
            raise UnsupportedModelError("only absolute position embeddings are supported")
        for layer in model.encoder.layer:
            att = layer.attention
            if type(att.self) is not mb.BertSelfAttention:
                raise UnsupportedModelError(f"{type(att.self).__name__} is not supported")
            if not _gelu(layer.intermediate.intermediate_act_fn):
                raise UnsupportedModelError(
                    f"{type(layer.intermediate.intermediate_act_fn).__name__} activation")
            s = att.self
            att.self = QSelfAttention(
                s, qlinear(_fuse(s.query, s.key, s.value), factory, "linear_input", post_ln=True),
                factory.activation("qk"), factory.activation("qk"),
                factory.activation("value"), factory.activation("post_softmax"))
            layer.intermediate.dense = qlinear(layer.intermediate.dense, factory,
                                               "linear_input", post_ln=True)
            layer.output.dense = qlinear(layer.output.dense, factory, "post_gelu")
            gelu_pair(layer.intermediate.dense, layer.output.dense)
        # The rest: the attention output projection, every LayerNorm, the pooler's Linear.
        _replace_children(model, lambda m: plain_twin(m, factory))
        if model.pooler is not None:  # it reads [CLS] alone: no token axis to split
            model.pooler.dense.first_q = None
        attach_param_quantizers(model, list(TABLES), factory, axis=0)
        check_fully_rewritten(model, containers=(mb.BertAttention,))
        return model

    def lower(self, model: nn.Module):
        from ..integer.lower_bert import lower_bert

        return lower_bert(model)

    def architecture(self, model: nn.Module) -> dict:
        cfg = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE}
        return {"family": self.family, "config": cfg, "pooler": model.pooler is not None}

    def build(self, arch: dict) -> nn.Module:
        from transformers import BertConfig, BertModel

        config = BertConfig.from_dict(arch["config"])
        config._attn_implementation = "eager"  # masks as additive floats, on any machine
        return BertModel(config, add_pooling_layer=bool(arch["pooler"])).eval()
