"""``quantize``: the library's entry point, and the module it returns."""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

import timm
import torch
from torch import Tensor, nn

from .adapters import find_adapter
from .calibrate import (
    Progress,
    calibrate_modules,
    calibrate_parameters,
    collect_statistics,
    param_quantizers,
    quant_modules,
    release_statistics,
    round_float_parameters,
)
from .config import QuantConfig
from .factory import QuantizerFactory, apply_overrides
from .inputs import Inputs, call, count, digest, take, to_device
from .metrics import sqnr_db
from .quantizers import Quantizer

if TYPE_CHECKING:
    from .integer.program import Program


class QuantizedModel(nn.Module):
    """A model's fully (or partially) quantized twin, plus the recipe that made it."""

    def __init__(self, model: nn.Module, config: QuantConfig, architecture: dict,
                 info: dict | None = None, program: Program | None = None) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.architecture = architecture
        self.info = dict(info or {})
        self.metrics: dict = {}
        # The integer setting's program (``quant.integer``): what ``forward`` runs there.
        self.program = program

    def forward(self, *args, **kwargs):
        if self.program is not None:
            return self.program.forward(*args, **kwargs)
        if len(args) == 1 and not kwargs and isinstance(args[0], Mapping):
            return self.model(**args[0])  # a text batch, as its tokenizer returned it
        return self.model(*args, **kwargs)

    def quantizers(self) -> Iterator[tuple[str, Quantizer]]:
        for name, m in self.model.named_modules():
            if isinstance(m, Quantizer):
                yield name, m

    def layer_report(self) -> dict[str, dict]:
        """Per-quantizer configuration, JSON-ready."""
        return {n: {"kind": q.kind, "enabled": q.enabled, **q.describe()}
                for n, q in self.quantizers() if bool(q.calibrated)}

    @contextmanager
    def probe_sqnr(self) -> Iterator[Callable[[], dict[str, float]]]:
        """Measure signal-to-quantization-noise ratio (dB) per tensor kind over the forward passes
        run inside the block: ``with q.probe_sqnr() as read: q(x); print(read())``."""
        qs = [q for _, q in self.quantizers() if q.enabled and bool(q.calibrated)]
        probes = [(q.kind, {"signal": 0.0, "noise": 0.0}) for q in qs]
        for q, (_, probe) in zip(qs, probes, strict=True):
            q.probe = probe

        def read() -> dict[str, float]:
            acc: dict[str, list[float]] = {}
            for kind, probe in probes:
                if probe["signal"] == 0 and probe["noise"] == 0:
                    continue  # never ran in forward (parameters quantized once, in place)
                a = acc.setdefault(kind, [0.0, 0.0])
                a[0] += probe["signal"]
                a[1] += probe["noise"]
            return {k: sqnr_db(s, n) for k, (s, n) in acc.items()}

        try:
            yield read
        finally:
            for q in qs:
                q.probe = None


# What may differ between calibrations that share one statistics pass: bit widths and pinned
# search parameters (what a search varies), not which quantizer sits where or how it scores.
VARIABLE_FIELDS = frozenset({"w_bits", "a_bits", "image_bits", "bit_overrides", "pinned",
                             "search_points"})


class Calibrator:
    """Collects the calibration statistics of ``model`` once, then calibrates any number of
    configurations that differ only in ``VARIABLE_FIELDS``. Each calibration is exactly what
    ``quantize`` gives for that configuration, since every quantizer is searched on the FP
    statistics alone."""

    def __init__(self, model: nn.Module, calib_images: Inputs,
                 config: QuantConfig | None = None) -> None:
        self.config = config = config or QuantConfig()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        adapter = find_adapter(model)
        adapter.check_inputs(calib_images)
        self.architecture = adapter.architecture(model)
        device = next(model.parameters()).device
        self.images = to_device(take(calib_images, 0, config.calib_size), device)
        resolved = adapter.resolve(config)
        fp = copy.deepcopy(model).eval()
        if config.post_ln_reparam:
            adapter.reparameterize(fp, lambda: call(fp, self.images))
        # Quantizers are born on the CPU: move the whole twin to the model's device.
        twin = adapter.rewrite(fp, QuantizerFactory(resolved))
        apply_overrides(twin, config)
        self.twin = twin.to(device)
        start = time.perf_counter()
        collect_statistics(self.twin, self.images, resolved, adapter.task_loss)
        self.statistics_seconds = time.perf_counter() - start
        self.calib_digest = digest(self.images)
        self.adapter = adapter
        self.versions = adapter.versions()
        self._fp_params = {n: self.twin.get_parameter(n).detach().clone()
                           for n in param_quantizers(self.twin)}
        self._last: dict[str, tuple] = {}  # module -> what its last calibration was given
        # (module, signature) -> its quantizers' calibrated state, for ``incremental`` calls.
        self._done: OrderedDict[tuple[str, tuple], dict[str, dict]] = OrderedDict()
        self._fresh: list[tuple[str, tuple]] = []  # searched here since the last export
        self.modules_searched = 0  # module calibrations searched (not restored), every call
        # Signature of the parameter quantizers -> their state and the quantized parameters.
        self._params_done: OrderedDict[tuple, dict[str, tuple[dict, Tensor]]] = OrderedDict()
        self.parameter_searches = 0  # calibrations of the parameter quantizers searched

    @staticmethod
    def _signature(m: nn.Module, config: QuantConfig) -> tuple:
        return config.search_points, tuple(
            (n, q.bits, repr(sorted(q.restrict.items())))
            for n, q in m.local_quantizers().items())

    # A search revisits the same (module, widths, pins) again and again: a greedy step tries a
    # layer one width lower and usually reverts it. Kept calibrations are a few scales per
    # channel each; the bound only guards against an unbounded search.
    MAX_REMEMBERED = 4096

    @staticmethod
    def _quantizer_state(q: Quantizer) -> dict:
        return {"buffers": {k: v.clone() for k, v in q._buffers.items() if v is not None},
                "chosen_threshold": getattr(q, "chosen_threshold", None)}

    def _remember(self, key: tuple[str, tuple], m: nn.Module, fresh: bool = True) -> None:
        """``fresh``: exported to the other workers by the next ``export_calibrations``."""
        state = {a: self._quantizer_state(q) for a, q in m.local_quantizers().items()}
        extras = m.calibration_extras()
        if extras:
            state[self.EXTRAS] = {k: v.clone() for k, v in extras.items()}
        self._keep(key, state)
        if fresh:  # bounded, if never exported
            self._fresh = [*self._fresh[-self.MAX_REMEMBERED + 1:], key]

    def _calibrate_parameters(self, config: QuantConfig) -> None:
        """The parameter quantizers (position embedding, class token, lookup tables), each
        searched on its FP parameter alone: remembered by their widths and pins like a
        module's calibration, since every call starts again from the FP parameters and a
        search's candidates rarely change them (each call searched them anew: 19 ms of a
        digits ViT candidate's ~45 ms of calibration)."""
        qs = {n: q for n, q in param_quantizers(self.twin).items() if q.enabled}
        key = (config.search_points, tuple((n, q.bits, repr(sorted(q.restrict.items())))
                                           for n, q in qs.items()))
        kept = self._params_done.get(key)
        if kept is None:
            calibrate_parameters(self.twin, config)
            self.parameter_searches += 1
            self._params_done[key] = {n: (self._quantizer_state(q),
                                          self.twin.get_parameter(n).detach().clone())
                                      for n, q in qs.items()}
            if len(self._params_done) > self.MAX_REMEMBERED:
                self._params_done.popitem(last=False)
            return
        self._params_done.move_to_end(key)
        with torch.no_grad():
            for n, (state, value) in kept.items():
                self._restore_quantizer(qs[n], state)
                self.twin.get_parameter(n).copy_(value)

    def _keep(self, key: tuple[str, tuple], state: dict[str, dict]) -> None:
        self._done[key] = state
        if len(self._done) > self.MAX_REMEMBERED:
            self._done.popitem(last=False)

    def export_calibrations(self) -> dict:
        """The module calibrations searched here since the last export, for
        ``import_calibrations`` of another Calibrator built on the same model and statistics
        (the workers of one search: each then skips the searches the others made)."""
        items = {k: self._done[k] for k in self._fresh if k in self._done}
        self._fresh = []
        return {"calib_digest": self.calib_digest, "items": items}

    def import_calibrations(self, calibrations: dict) -> None:
        if calibrations["calib_digest"] != self.calib_digest:
            raise ValueError("these calibrations come from other calibration inputs")
        for key, state in calibrations["items"].items():
            if key not in self._done:
                self._keep(key, state)

    EXTRAS = "__extras__"  # a module's ``calibration_extras`` (GPTQ's rounded weight codes)

    @classmethod
    def _restore(cls, m: nn.Module, state: dict[str, dict]) -> None:
        for attr, st in state.items():
            if attr == cls.EXTRAS:
                continue
            cls._restore_quantizer(getattr(m, attr), st)
        m.restore_calibration_extras(state.get(cls.EXTRAS, {}))

    @staticmethod
    def _restore_quantizer(q: Quantizer, st: dict) -> None:
        """Put back what ``_quantizer_state`` kept."""
        for k, v in st["buffers"].items():
            setattr(q, k, v.clone())
        if hasattr(q, "chosen_threshold"):
            q.chosen_threshold = st["chosen_threshold"]

    def calibrate(self, config: QuantConfig | None = None, progress: Progress | None = None,
                  copy_model: bool = True, incremental: bool = False) -> QuantizedModel:
        """The twin calibrated under ``config`` (default: the constructor's).

        ``copy_model=False`` returns the live twin, valid until the next call (a search scoring
        candidates needs no copies). ``incremental=True`` recalibrates only the modules whose
        quantizers changed since the last call, and of those only the ones never calibrated
        before with the same widths and pins (the others get their remembered result): every
        module is searched on the FP statistics alone, so the result is the same, at a fraction
        of the cost when one layer changes."""
        config = config or self.config
        base, new = self.config.to_dict(), config.to_dict()
        changed = {k for k in base if base[k] != new[k]} - VARIABLE_FIELDS
        if changed:
            raise ValueError(f"these fields need a new statistics pass: {sorted(changed)}")
        factory = QuantizerFactory(config)
        for _, q in self.twin.named_modules():
            if isinstance(q, Quantizer):
                q.set_bits(factory.bits_for(q.kind))
                q.restrict = {}
        apply_overrides(self.twin, config)
        with torch.no_grad():
            for name, value in self._fp_params.items():
                self.twin.get_parameter(name).copy_(value)
        start = time.perf_counter()
        modules = quant_modules(self.twin)
        signatures = {n: self._signature(m, config) for n, m in modules}
        skip = set()
        if incremental:
            for n, m in modules:
                if self._last.get(n) == signatures[n]:
                    skip.add(n)
                elif (n, signatures[n]) in self._done:
                    self._restore(m, self._done[n, signatures[n]])
                    self._done.move_to_end((n, signatures[n]))
                    skip.add(n)
        resolved = self.adapter.resolve(config)  # its None fields as the family chooses
        calibrate_modules(self.twin, resolved, progress, skip=frozenset(skip))
        self.modules_searched += len(modules) - len(skip)
        if incremental:
            for n, m in modules:
                key = (n, signatures[n])
                if n not in skip:
                    self._remember(key, m)
                elif key not in self._done:
                    # Unchanged since a full calibration (a search's workers start from the one
                    # that built the search space): kept too, or a return to it after a probe
                    # searched it again (21 of 330 searches in a digits search, both workers at
                    # once). Not handed on: every worker has it.
                    self._remember(key, m, fresh=False)
        self._last = signatures
        self._calibrate_parameters(resolved)
        round_float_parameters(self.twin)
        seconds = time.perf_counter() - start
        if copy_model:
            modules = [m for _, m in modules]
            kept = [m.stats for m in modules]
            for m in modules:
                m.stats = {}
            try:
                model = copy.deepcopy(self.twin)
            finally:
                for m, stats in zip(modules, kept, strict=True):
                    m.stats = stats
        else:
            model = self.twin
        program = self.adapter.lower(model) if config.setting == "integer" else None
        info = {
            "calib_seconds": round(self.statistics_seconds + seconds, 3),
            "statistics_seconds": round(self.statistics_seconds, 3),
            "calib_images": count(self.images),  # images or texts
            "calib_digest": self.calib_digest,
            "timm_version": timm.__version__,
            "torch_version": torch.__version__,
            **self.versions,
        }
        return QuantizedModel(model, config, self.architecture, info, program).eval()


def quantize(model: nn.Module, calib_images: Inputs, config: QuantConfig | None = None,
             progress: Progress | None = None) -> QuantizedModel:
    """Rewrite ``model`` into its quantized twin and calibrate it on ``calib_images`` (the first
    ``config.calib_size`` of them, already normalised for the model). ``model`` is not changed.

    For a text encoder (Hugging Face BERT), ``calib_images`` is a mapping of token tensors
    (``input_ids``, ``attention_mask``, ``token_type_ids``), as its tokenizer returns them."""
    calibrator = Calibrator(model, calib_images, config)
    try:
        return calibrator.calibrate(progress=progress, copy_model=False)
    finally:
        release_statistics(calibrator.twin)
