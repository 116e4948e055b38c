"""Defaults decided on validation data: each option of each default, calibrated and compared.

    python -m bench.choices --json out/choices.json            # digits, then MiniLM
    python -m bench.choices --only digits                      # a minute or two
    python -m bench.choices --only minilm --choices keep_bulk  # one choice

Per choice, a table: each option at each width, tsptq fully quantized (the metric's table also
the baselines, since one metric serves every method), with the validation metrics that decide
(digits: agreement and KL against FP32 on ``--val-size`` training images that calibration did
not use; MiniLM: mean cosine, nearest-neighbour agreement and KL of the retrieval distributions
on ``--text-val-size`` validation texts) and the test split's metrics beside them, reported
only. Then the option validation chooses, by ``RULE``, and whether that is today's default.

Why this exists: every default used to be argued from test-split numbers; the test split only
reports now (BENCHMARKS.md, "Defaults chosen on validation").
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from bench.accuracy import WIDTHS as DIGITS_WIDTHS
from bench.accuracy import quantize_and_score, table, write_json
from bench.text import measure as measure_text
from quant import QuantConfig
from quant.adapters import find_adapter
from quant.evaluate import compare, logits_of
from quant.text import compare_embeddings, embeddings_of
from quant.zoo.data import EvalData, digits_data
from quant.zoo.models import load_model
from quant.zoo.text import TextData, text_data

# Two options whose geometric-mean validation KLs differ by less than this are tied.
TIE = 0.02
RULE = (f"lowest geometric mean of validation KL over the widths (and methods) of the table; "
        f"within {TIE:.0%} of it a tie, broken by the higher mean validation agreement, then "
        "by today's default")


@dataclass(frozen=True)
class Choice:
    """A default and the options it is chosen among (each a change to ``QuantConfig``)."""

    name: str
    options: tuple[tuple[str, dict], ...]
    methods: tuple[str, ...] = ("tsptq",)


METRIC = Choice("metric", tuple((m, {"metric": m}) for m in ("hessian", "mse", "cosine")),
                ("uniform", "twin", "ptf", "tsptq"))
POST_LN = Choice("post_ln", (("per-tensor", {"post_ln_two_scale": False}),
                             ("O-2SF", {"post_ln_two_scale": True}),
                             ("RepQ-ViT reparam", {"post_ln_reparam": True,
                                                   "post_ln_two_scale": False})))
OUTLIER_RULE = Choice("outlier_rule", (("threshold", {"outlier_rule": "threshold"}),
                                       ("sorted_split", {"outlier_rule": "sorted_split"})))
FIRST_TOKEN = Choice("first_token_scale", (("off", {"first_token_scale": False}),
                                           ("on", {"first_token_scale": True})))
KEEP_BULK = Choice("keep_bulk", (("off", {"keep_bulk": False}), ("on", {"keep_bulk": True})))
COARSE_OFFSET = Choice("coarse_offset", (("off", {"coarse_offset": False}),
                                         ("on", {"coarse_offset": True})))

DIGITS_CHOICES = (
    METRIC,
    COARSE_OFFSET,
    POST_LN,
    FIRST_TOKEN,
    OUTLIER_RULE,
    Choice("channel_zero_points", (("per channel", {"channel_zero_points": None}),
                                   ("one shared", {"channel_zero_points": False}))),
    Choice("search_points", (("50", {"search_points": 50}), ("100", {"search_points": 100}))),
    KEEP_BULK,
)
# RepQ-ViT cannot rescale a post-norm encoder's LayerNorm outputs (they are its residual stream).
TEXT_CHOICES = (
    Choice("post_ln_two_scale", POST_LN.options[:2]),
    KEEP_BULK,
    FIRST_TOKEN,
    Choice("metric", METRIC.options[:2]),  # cosine: far behind on the digits ViT
    OUTLIER_RULE,
    COARSE_OFFSET,
)
# W4A8's error is the 4-bit weights' (BENCHMARKS.md, "Weight rounding"), which no activation
# option here touches; one MiniLM calibration costs ~40 s.
TEXT_DEFAULT_WIDTHS = ((8, 8), (6, 6))


def is_default(model: torch.nn.Module, method: str, change: dict) -> bool:
    """Whether ``change`` is what ``QuantConfig()`` already gives ``model``'s family."""
    default = find_adapter(model).resolve(QuantConfig(method=method))
    return all(getattr(default, k) == v for k, v in change.items())


def _key(cfg: QuantConfig) -> str:
    return repr(sorted(cfg.to_dict().items()))


def _score(rows: list[dict], agreement: str) -> tuple[float, float]:
    logs = [math.log(max(r["val_kl"], 1e-12)) for r in rows]
    return math.exp(sum(logs) / len(logs)), sum(r[agreement] for r in rows) / len(rows)


def decide(choice: Choice, rows: list[dict], agreement: str = "val_agreement") -> dict:
    """The option ``RULE`` picks from ``choice``'s rows (every draw), each option's scores (and
    its geometric-mean KL per draw), and the default."""
    seeds = sorted({r["seed"] for r in rows})
    scores = {}
    for label, _ in choice.options:
        mine = [r for r in rows if r["option"] == label]
        kl, agree = _score(mine, agreement)
        per_draw = [_score([r for r in mine if r["seed"] == s], agreement)[0] for s in seeds]
        scores[label] = {"val_kl_geomean": float(f"{kl:.3g}"),
                         "mean_" + agreement: round(agree, 4),
                         "val_kl_per_draw": [float(f"{k:.3g}") for k in per_draw]}
    default = next((r["option"] for r in rows if r["default"]), None)
    best = min(v["val_kl_geomean"] for v in scores.values())
    tied = [k for k, v in scores.items() if v["val_kl_geomean"] <= best * (1 + TIE)]
    top = max(scores[k]["mean_" + agreement] for k in tied)
    tied = [k for k in tied if scores[k]["mean_" + agreement] >= top - 1e-9]
    chosen = default if default in tied else tied[0]
    return {"choice": choice.name, "default": default, "chosen": chosen,
            "changed": chosen != default, "draws": len(seeds), "scores": scores}


def _run(model, choices, widths, scorers: dict, desc: str, done: dict[str, dict]) -> list[dict]:
    """Every (choice, option, method, width) on every calibration draw (``scorers``: seed ->
    the scoring function of that draw's data); a configuration met twice (in ``done``, across
    calls; as ``model``'s family resolves it, so an option equal to the family's choice is the
    default's row) is calibrated once."""
    resolve = find_adapter(model).resolve
    rows = []
    grid = [(c, o, m, w, s) for c in choices for o in c.options for m in c.methods
            for w in widths for s in scorers]
    for choice, (label, change), method, (wb, ab), seed in tqdm(grid, desc=desc,
                                                                 file=sys.stderr):
        cfg = QuantConfig(method=method, w_bits=wb, a_bits=ab, seed=seed, **change)
        key = _key(resolve(cfg))
        if key not in done:
            done[key] = scorers[seed](cfg)
        rows.append({"choice": choice.name, "option": label, "method": method, "seed": seed,
                     "default": None, **done[key]})
    return rows


def digits_rows(model: torch.nn.Module, draws: dict[int, EvalData], choices=DIGITS_CHOICES,
                widths=DIGITS_WIDTHS, done: dict | None = None) -> list[dict]:
    """Each option's validation agreement and KL against FP32 (``x_val``) and its test top-1,
    agreement and KL (reported only), per calibration draw (``draws``: seed -> its data)."""
    def scorer(data: EvalData):
        fp_test, fp_val = logits_of(model, data.x_test), logits_of(model, data.x_val)

        def score(cfg: QuantConfig) -> dict:
            row, _, qmodel = quantize_and_score(model, data, fp_test, cfg)
            val = compare(fp_val, logits_of(qmodel, data.x_val), fp_val.argmax(-1))
            return {"val_agreement": round(val.agreement, 4), "val_kl": float(f"{val.kl:.3g}"),
                    **row}
        return score

    rows = _run(model, choices, widths, {s: scorer(d) for s, d in draws.items()}, "digits choices",
                {} if done is None else done)
    return _mark_defaults(model, choices, rows)


def text_rows(model: torch.nn.Module, draws: dict[int, TextData], choices=TEXT_CHOICES,
              widths=TEXT_DEFAULT_WIDTHS, done: dict | None = None) -> list[dict]:
    """Each option's validation cosine, nearest-neighbour agreement and KL (``x_val``) and its
    test metrics (reported only), per calibration draw."""
    def scorer(data: TextData):
        fp_test, fp_val = embeddings_of(model, data.x_test), embeddings_of(model, data.x_val)

        def score(cfg: QuantConfig) -> dict:
            row, _, qmodel = measure_text(model, data, fp_test, cfg)
            val = compare_embeddings(fp_val, embeddings_of(qmodel, data.x_val))
            return {"val_cosine": round(val.cosine, 4),
                    "val_nn_agreement": round(val.nn_agreement, 4),
                    "val_kl": float(f"{val.kl:.3g}"), **row}
        return score

    rows = _run(model, choices, widths, {s: scorer(d) for s, d in draws.items()},
                "MiniLM choices",
                {} if done is None else done)
    return _mark_defaults(model, choices, rows)


def _mark_defaults(model, choices, rows: list[dict]) -> list[dict]:
    options = {(c.name, label): change for c in choices for label, change in c.options}
    for r in rows:
        r["default"] = is_default(model, r["method"], options[(r["choice"], r["option"])])
    return rows


DIGITS_COLUMNS = ["option", "method", "w_bits", "a_bits", "val_agreement", "val_kl", "top1",
                  "agreement", "kl", "calib_s"]
TEXT_COLUMNS = ["option", "w_bits", "a_bits", "val_cosine", "val_nn_agreement", "val_kl",
                "cosine", "nn_agreement", "nn_at_128", "kl", "calib_s"]


def report(title: str, choices, rows: list[dict], columns: list[str],
           agreement: str) -> list[dict]:
    """Print each choice's table (the first draw's rows) and decision (every draw's); return
    the decisions."""
    decisions = []
    for choice in choices:
        mine = [r for r in rows if r["choice"] == choice.name]
        if not mine:
            continue
        d = decide(choice, mine, agreement)
        decisions.append(d)
        cols = [c for c in columns if c != "method" or len(choice.methods) > 1]
        first = min(r["seed"] for r in mine)
        shown = [{**r, "option": r["option"] + (" (default)" if r["default"] else "")}
                 for r in mine if r["seed"] == first]
        print(f"\n## {title}: {choice.name} (validation chooses; test reported only; "
              f"calibration draw {first} of {d['draws']})\n")
        print(table(shown, cols))
        scores = "; ".join(
            f"{k}: KL {v['val_kl_geomean']} (per draw {', '.join(map(str, v['val_kl_per_draw']))})"
            f", {agreement} {v['mean_' + agreement]}" for k, v in d["scores"].items())
        verdict = "changed from " + str(d["default"]) if d["changed"] else "the default, kept"
        print(f"\nchosen on validation: {d['chosen']} ({verdict}); geometric-mean validation "
              f"KL and mean agreement over {d['draws']} draw(s): {scores}")
    if decisions:
        print(f"\n## {title}: decisions ({RULE})\n")
        print(table(decisions, ["choice", "default", "chosen", "changed", "draws"]))
    return decisions


def together(choices, decisions: list[dict]) -> Choice | None:
    """Today's defaults against every option validation chose, all at once: options chosen one
    at a time may not add up. None when nothing changed."""
    change: dict = {}
    for c in choices:
        d = next((d for d in decisions if d["choice"] == c.name), None)
        if d is not None and d["changed"]:
            change.update(dict(c.options)[d["chosen"]])
    if not change:
        return None
    label = ", ".join(f"{k}={v}" for k, v in change.items())
    return Choice("together", (("today's defaults", {}), (label, change)))


def decide_all(title: str, choices, rows_of, columns: list[str], agreement: str) -> dict:
    """Rows and decisions of ``choices`` (``rows_of(choices)`` scores them), then the chosen
    options together against today's defaults."""
    rows = rows_of(choices)
    decisions = report(title, choices, rows, columns, agreement)
    both = together(choices, decisions)
    if both is not None:
        more = rows_of((both,))
        decisions += report(title, (both,), more, columns, agreement)
        rows += more
    return {"rows": rows, "decisions": decisions}


def _selected(choices, names: list[str] | None):
    if not names:
        return choices
    return tuple(c for c in choices if c.name in names)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", type=Path, help="write the rows and decisions here")
    p.add_argument("--only", choices=("digits", "minilm"), help="one model's choices")
    p.add_argument("--choices", nargs="+", metavar="NAME",
                   help="a subset of the choices, by name (e.g. metric coarse_offset)")
    p.add_argument("--val-size", type=int, default=512,
                   help="digits: validation images (training images calibration did not use)")
    p.add_argument("--draws", type=int, default=3,
                   help="digits: calibration draws (seeds 0..K-1) every option is scored on")
    p.add_argument("--text-val-size", type=int, default=256, help="MiniLM: validation texts")
    p.add_argument("--text-draws", type=int, default=1, help="MiniLM: calibration draws")
    p.add_argument("--text-test-limit", type=int, help="MiniLM: a fixed subset of test texts")
    p.add_argument("--text-widths", nargs="+", default=[f"{w}/{a}" for w, a in TEXT_DEFAULT_WIDTHS],
                   metavar="W/A", help="MiniLM widths (default: 8/8 6/6)")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    out: dict = {"rule": RULE}
    if args.only in (None, "digits"):
        model, done = load_model("digits_vit"), {}
        draws = {s: digits_data(seed=s, val_size=args.val_size) for s in range(args.draws)}
        out["digits"] = decide_all(
            f"digits ViT ({args.val_size} validation images, 360 test images)",
            _selected(DIGITS_CHOICES, args.choices),
            lambda cs: digits_rows(model, draws, cs, done=done), DIGITS_COLUMNS, "val_agreement")
    if args.only in (None, "minilm"):
        model, done = load_model("minilm"), {}
        widths = tuple(tuple(int(v) for v in s.split("/")) for s in args.text_widths)
        draws = {s: text_data(seed=s, val_size=args.text_val_size,
                              test_limit=args.text_test_limit) for s in range(args.text_draws)}
        data = draws[0]
        out["minilm"] = decide_all(
            f"MiniLM ({len(data.val_texts)} validation texts, {len(data.test_texts)} test texts, "
            "32 calibration texts)", _selected(TEXT_CHOICES, args.choices),
            lambda cs: text_rows(model, draws, cs, widths, done), TEXT_COLUMNS,
            "val_nn_agreement")
    if args.json:
        write_json(args.json, out, [])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
