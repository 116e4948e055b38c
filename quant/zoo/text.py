"""A real text corpus that no one here wrote: the docstrings of the Python standard library.

Built the same way on any machine with the same Python version (the stdlib's docstrings differ
between versions; ``TextCorpus.digest`` names the result):

1. every ``.py`` file of every top-level stdlib module and package (``sys.stdlib_module_names``),
   test suites excluded, is parsed with ``ast`` (nothing is imported, so nothing runs);
2. each module, class and function docstring gives its first paragraph, whitespace collapsed;
3. kept when it has at least 4 words and 20 to 256 characters (a summary sentence or two: long
   texts would pad every calibration batch to their length);
4. de-duplicated case-insensitively (the model's tokenizer is uncased) and sorted;
5. split by a fixed rule on the sha256 of the lower-cased text: ``% 10 == 0`` the test part,
   ``== 1`` the validation part, the rest the calibration pool, from which ``calib_size`` (32)
   texts are drawn with the seed (as the digits benchmark draws its calibration images).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from ..text import compare_embeddings, embeddings_of
from .data import pick_calibration, pick_validation

MIN_WORDS, MIN_CHARS, MAX_CHARS = 4, 20, 256
BUCKETS, TEST_BUCKET, VAL_BUCKET = 10, 0, 1
_SKIP_DIRS = {"test", "tests", "idle_test"}


@dataclass(frozen=True)
class TextCorpus:
    pool: list[str]        # calibration candidates
    validation: list[str]
    test: list[str]
    digest: str            # sha256 over every text, in order, with its part
    python: str            # the version whose stdlib gave the texts


@dataclass(frozen=True)
class TextData:
    """Token tensors of each part, as ``quantize`` and the encoder take them."""

    calib: dict[str, Tensor]
    x_test: dict[str, Tensor]
    calib_ids: list[int]        # indices of the calibration texts in the pool
    x_val: dict[str, Tensor] = field(default_factory=dict)  # empty unless asked for
    calib_texts: list[str] = field(default_factory=list)
    test_texts: list[str] = field(default_factory=list)
    val_texts: list[str] = field(default_factory=list)
    corpus_digest: str = ""


def _source_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for name in sorted(sys.stdlib_module_names):
        single, package = root / f"{name}.py", root / name
        if single.is_file():
            files.append(single)
        elif package.is_dir():
            files += [f for f in sorted(package.rglob("*.py"))
                      if not any(p in _SKIP_DIRS or p.startswith("test_")
                                 for p in f.relative_to(root).parts)]
    return files


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return [d for n in ast.walk(tree) if isinstance(n, kinds) and (d := ast.get_docstring(n))]


def _summary(doc: str) -> str:
    return " ".join(re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0].split())


def _bucket(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.lower().encode()).digest()[:8], "big") % BUCKETS


@functools.lru_cache(maxsize=1)
def stdlib_corpus() -> TextCorpus:
    """The de-duplicated, sorted, split corpus (about 7,000 texts on Python 3.11)."""
    unique: dict[str, str] = {}
    for path in _source_files():
        for doc in _docstrings(path):
            text = _summary(doc)
            if len(text.split()) >= MIN_WORDS and MIN_CHARS <= len(text) <= MAX_CHARS:
                unique.setdefault(text.lower(), text)
    texts = sorted(unique.values())
    parts: dict[int, list[str]] = {TEST_BUCKET: [], VAL_BUCKET: [], -1: []}
    h = hashlib.sha256()
    for t in texts:
        b = _bucket(t)
        part = b if b in (TEST_BUCKET, VAL_BUCKET) else -1
        parts[part].append(t)
        h.update(f"{part}\t{t}\n".encode())
    return TextCorpus(parts[-1], parts[VAL_BUCKET], parts[TEST_BUCKET], h.hexdigest(),
                      sys.version.split()[0])


def text_data(calib_size: int = 32, seed: int = 0, val_size: int = 0,
              test_limit: int | None = None) -> TextData:
    """Calibration, validation and test texts tokenized for MiniLM. ``test_limit`` keeps a fixed
    random subset of the test part (the same for every seed)."""
    from .minilm import tokenize

    corpus = stdlib_corpus()
    ids = pick_calibration(len(corpus.pool), calib_size, seed)
    val_ids = pick_validation(len(corpus.validation), [], val_size, seed)
    test = corpus.test
    if test_limit is not None:
        test = [test[i] for i in pick_calibration(len(test), test_limit, 0)]
    calib_texts = [corpus.pool[i] for i in ids]
    val_texts = [corpus.validation[i] for i in val_ids]
    return TextData(tokenize(calib_texts), tokenize(test), ids,
                    tokenize(val_texts) if val_texts else {}, calib_texts, test, val_texts,
                    corpus.digest)


def evaluate_text(model: nn.Module, qmodel: nn.Module, texts: dict[str, Tensor]) -> dict:
    """The quantized encoder against FP32 on ``texts``, with the keys of an image result
    (``top1``, ``fp32_top1``, ``agreement``, ``kl``) plus ``cosine``, ``min_cosine`` and
    ``nn_agreement`` (see ``quant.text.TextAgreement``)."""
    return compare_embeddings(embeddings_of(model, texts), embeddings_of(qmodel, texts)).to_dict()
