"""The integer engine: a saved checkpoint's integer program, run with integer tensors only.

It reads the checkpoint file alone (the program's operators from the recipe, their integer
constants from the file's tensors): no model class, no quantizer, no float weight is built.
Between the image quantizer on the way in and the logits' dequantization on the way out, every
operator's output is checked to be an integer tensor (``Program.run`` raises ``FloatLeak``).
"""

from __future__ import annotations

import os

from torch import Tensor

from ..checkpoint import read_program
from .program import Op, Program


def load_program(path: str | os.PathLike) -> Program:
    return read_program(path)


class IntegerEngine:
    """``IntegerEngine.load(path)(images)`` -> logits (float32, the final dequantization)."""

    def __init__(self, program: Program) -> None:
        self.program = program

    @classmethod
    def load(cls, path: str | os.PathLike) -> IntegerEngine:
        return cls(load_program(path))

    def __call__(self, *args, **kwargs):
        return self.program.forward(*args, **kwargs)

    def trace(self, *args, **kwargs) -> list[tuple[Op, Tensor]]:
        """Every operator run, with its output (the no-float test walks these)."""
        seen: list[tuple[Op, Tensor]] = []
        self.program.run(*args, trace=lambda op, out: seen.append((op, out)), **kwargs)
        return seen
