"""Drift-detection evaluation: power of the BN-statistic detector against BBSD on MNIST shifts.

Follows the "Failing Loudly" protocol (Rabanser, Günnemann & Lipton, NeurIPS 2019): for every shift and window
size W, draw random windows of W shifted test images and count how often a detector fires (its power); on clean
test windows the same count is the false-alarm rate.

- BN: the artifact's whole-model statistic (max over BN layers of score / layer threshold) above its calibrated
  threshold at W. Per-image BN moments are computed once per dataset variant, so each window is an index sum.
- BBSD (black-box shift detection on softmax outputs): a two-sample KS test per class probability against a
  fresh sample of clean validation images, Bonferroni-corrected.

    python -m bench.drift_eval [--artifact artifacts/mnist-bn] [--trials 100] [--windows 10,20,50] [--fast]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or in CI

import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.stats import binomtest, fisher_exact, ks_2samp
from torch import nn

from model.artifact import load_artifact
from model.bnstats import LayerReference, Moments, layer_references, window_scores
from model.calibration import Calibration, calibrate, random_windows
from model.preprocess import Normalization
from training.calibrate import collect_moments
from training.data import default_cache_dir, load_mnist
from training.shifts import LABEL_SHIFTS, apply_shift, covariate_shifts, label_shift_indices

WINDOWS = (10, 20, 50, 100, 200, 500, 1000)
TRIALS = 100  # windows per shift and W: a 95% interval of about ±0.1 on a power near 0.5
CLEAN_WINDOWS = 1000  # clean windows per W: a 95% interval of about ±0.6% on a 1% false-alarm rate
FAST_SHIFTS = ("invert", "gaussian_noise_large")
FAST_WINDOWS = (50, 200)
FAST_POOL = 2000  # test (and validation) images per variant in --fast mode
FAST_TRIALS = 20
FAST_CLEAN_WINDOWS = 400
LAYER_TABLE_W = 100  # window size of the per-layer table
_GATHER_ELEMENTS = 4_000_000  # bound on a (windows, W, C) gather, ~32 MB of float64


@dataclass(frozen=True)
class Variant:
    """One dataset variant (clean or shifted images): per-image BN moments and softmax outputs."""

    moments: dict[str, Moments]
    probs: np.ndarray  # (N, classes) float64


@dataclass(frozen=True)
class Detections:
    """Which of K windows each detector flagged."""

    bn: np.ndarray  # (K,) bool, whole-model statistic
    layers: dict[str, np.ndarray]  # each BN layer alone at its own threshold
    bbsd: np.ndarray  # (K,) bool


def embed(net: nn.Module, norm: Normalization, images: np.ndarray) -> Variant:
    """Moments and softmax of float32 (N, 28, 28) images in [0, 1], in one forward pass over them."""
    x = norm.apply(torch.from_numpy(images).unsqueeze(1))
    logits: list[torch.Tensor] = []
    # collect_moments runs the batches in order; keeping its outputs saves a second pass per variant.
    handle = net.register_forward_hook(lambda _m, _i, out: logits.append(out.detach()))
    try:
        moments = collect_moments(net, x)
    finally:
        handle.remove()
    probs = torch.cat(logits).double().softmax(dim=1).numpy()  # float64: fewer ties near 0 and 1 for KS
    return Variant(moments, probs)


@dataclass(frozen=True)
class Detectors:
    """The BN detector (artifact calibration, plus eval-time calibration below its smallest W) and BBSD."""

    references: dict[str, LayerReference]
    calibration: Calibration
    small: Calibration | None  # windows below calibration.min_window, calibrated here on the validation split
    reference_probs: np.ndarray  # (M, classes) clean validation softmax, the BBSD reference pool
    reference_size: int
    alpha: float

    def calibration_at(self, w: int) -> Calibration:
        if w >= self.calibration.min_window:
            return self.calibration
        if self.small is None or w not in self.small.window_sizes:
            raise ValueError(f"no calibration for W={w}")
        return self.small

    def run(self, variant: Variant, windows: np.ndarray, rng: np.random.Generator) -> Detections:
        """Flag each of the (K, W) index windows into the variant's images."""
        w = windows.shape[1]
        cal = self.calibration_at(w)
        widest = max(m.s1.shape[1] for m in variant.moments.values())
        chunk = max(1, _GATHER_ELEMENTS // (w * widest))
        parts = [
            window_scores(variant.moments, self.references, windows[i : i + chunk])
            for i in range(0, len(windows), chunk)
        ]
        scores = {name: np.concatenate([p[name] for p in parts]) for name in self.references}
        bn = cal.model_statistic(scores, w) > cal.model_threshold(w)
        layers = {name: s > cal.layer_threshold(name, w) for name, s in scores.items()}
        n_ref, n_classes = self.reference_probs.shape
        bbsd = np.empty(len(windows), dtype=bool)
        for k, idx in enumerate(windows):
            reference = self.reference_probs[rng.choice(n_ref, size=self.reference_size, replace=False)]
            p = ks_2samp(reference, variant.probs[idx], axis=0).pvalue  # (classes,)
            bbsd[k] = np.min(p) < self.alpha / n_classes  # Bonferroni over the class outputs
        return Detections(bn=bn, layers=layers, bbsd=bbsd)


def proportion(k: int, n: int) -> dict[str, Any]:
    """k hits in n windows: the rate with its binomial standard error and 95% Wilson interval."""
    p = k / n
    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    return {"rate": p, "hits": k, "n": n, "se": math.sqrt(p * (1 - p) / n), "ci95": [ci.low, ci.high]}


def rate(hits: np.ndarray) -> dict[str, Any]:
    return proportion(int(hits.sum()), int(hits.size))


def summarise(by_w: dict[int, Detections]) -> dict[str, Any]:
    return {
        "bn": {str(w): rate(d.bn) for w, d in by_w.items()},
        "bbsd": {str(w): rate(d.bbsd) for w, d in by_w.items()},
        "layers": {str(w): {name: float(h.mean()) for name, h in d.layers.items()} for w, d in by_w.items()},
    }


def unit(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / np.float32(255.0)


def shift_windows(name: str, labels: np.ndarray, w: int, trials: int, rng: np.random.Generator) -> np.ndarray:
    """(trials, w) image indices: uniform for a covariate shift, only the shift's classes for a label shift."""
    if name in LABEL_SHIFTS:
        seeds = rng.integers(2**31, size=trials)
        return np.stack([label_shift_indices(labels, LABEL_SHIFTS[name], w, seed=int(s)) for s in seeds])
    return random_windows(len(labels), w, trials, rng)


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole protocol and return every number (the JSON report)."""
    started = time.perf_counter()
    art = load_artifact(args.artifact)
    if art.calibration is None:
        raise SystemExit(f"error: {args.artifact} has no drift calibration")
    cal = art.calibration
    splits = load_mnist(args.data_dir or default_cache_dir())
    # A random subset, never a prefix: the test split is ordered (its first 5000 images are the cleaner NIST SD-3
    # writers), so a prefix is itself a shifted sample.
    pick = np.random.default_rng(args.seed).permutation(len(splits.test_y))[: args.pool]
    test_x, test_y = unit(splits.test_x[pick]), splits.test_y[pick]
    if max(args.windows) > len(test_x):
        raise SystemExit(f"error: W={max(args.windows)} exceeds the {len(test_x)} test images")
    if args.reference_size > len(splits.val_y[: args.pool]):
        raise SystemExit(f"error: --reference-size {args.reference_size} exceeds the validation images")
    refs = layer_references(art.net)
    val_pick = np.random.default_rng(args.seed + 1).permutation(len(splits.val_y))[: args.pool]
    val = embed(art.net, art.normalization, unit(splits.val_x[val_pick]))
    small_ws = tuple(w for w in args.windows if w < cal.min_window)
    small = None
    if small_ws:  # same procedure and split as the artifact's calibration, at the missing window sizes
        small = calibrate(
            val.moments,
            refs,
            window_sizes=small_ws,
            windows_per_size=cal.windows_per_size,
            quantile=cal.quantile,
            seed=args.seed,
        )
    alpha = 1.0 - cal.quantile
    det = Detectors(refs, cal, small, val.probs, args.reference_size, alpha)
    rng = np.random.default_rng(args.seed)
    clean = embed(art.net, art.normalization, test_x)
    log(f"clean embeddings ready ({time.perf_counter() - started:.0f} s)")
    false_alarm = summarise(
        {w: det.run(clean, random_windows(len(test_x), w, args.clean_windows, rng), rng) for w in args.windows}
    )
    log(f"false alarms done ({time.perf_counter() - started:.0f} s)")

    shifts: dict[str, Any] = {}
    catalogue = covariate_shifts()
    for i, name in enumerate(args.shifts):
        if name in LABEL_SHIFTS:
            variant, kind, description = clean, "label", f"windows drawn only from classes {list(LABEL_SHIFTS[name])}"
        else:
            variant = embed(art.net, art.normalization, apply_shift(name, test_x, seed=args.seed + 1 + i))
            kind, description = "covariate", catalogue[name].description
        by_w = {w: det.run(variant, shift_windows(name, test_y, w, args.trials, rng), rng) for w in args.windows}
        shifts[name] = {"kind": kind, "description": description} | summarise(by_w)
        log(f"{name} done ({time.perf_counter() - started:.0f} s)")

    return {
        "artifact": {
            "path": str(art.path),
            "name": art.meta.name,
            "version": art.meta.version,
            "sha256": art.sha256,
            "test_accuracy": art.meta.metrics.get("test_accuracy"),
        },
        "setup": {
            "trials": args.trials,
            "windows": list(args.windows),
            "clean_windows": args.clean_windows,
            "test_pool": len(test_x),
            "bbsd_reference_size": args.reference_size,
            "bbsd_reference_pool": len(val.probs),
            "alpha": alpha,
            "seed": args.seed,
            "fast": args.fast,
            "calibration": {
                "artifact_windows": list(cal.window_sizes),
                "quantile": cal.quantile,
                "windows_per_size": cal.windows_per_size,
                "eval_calibrated_windows": list(small_ws),
                "eval_calibration": small.to_dict() if small else None,
                "model_threshold": {str(w): det.calibration_at(w).model_threshold(w) for w in args.windows},
            },
        },
        "false_alarm": false_alarm,
        "shifts": shifts,
        "layer_table_w": min(args.windows, key=lambda w: abs(math.log(w / LAYER_TABLE_W))),
        "runtime_seconds": round(time.perf_counter() - started, 1),
    }


def targets(res: dict[str, Any]) -> list[str]:
    """The stated targets, each with its measured value and whether it is met."""
    alpha, ws = res["setup"]["alpha"], [str(w) for w in res["setup"]["windows"]]
    lines = []
    fa = res["false_alarm"]["bn"]
    above = [w for w in ws if fa[w]["ci95"][0] > alpha]
    worst = max(ws, key=lambda w: fa[w]["rate"])
    pooled = {
        d: proportion(sum(v["hits"] for v in res["false_alarm"][d].values()), len(ws) * res["setup"]["clean_windows"])
        for d in ("bn", "bbsd")
    }
    lines.append(
        "Pooled over W, clean false alarm: "
        + ", ".join(f"{d.upper()} {r['rate']:.2%} ({r['ci95'][0]:.2%}–{r['ci95'][1]:.2%})" for d, r in pooled.items())
    )
    lines.append(
        f"Clean false alarm ≤ {alpha:.0%}: worst W={worst} at {fa[worst]['rate']:.2%} "
        f"(95% CI {fa[worst]['ci95'][0]:.2%}–{fa[worst]['ci95'][1]:.2%}); "
        + ("**met** (no W significantly above)" if not above else f"**not met** at W={', '.join(above)}")
    )
    cov = [s for s in res["shifts"].values() if s["kind"] == "covariate"]
    if cov and str(res["layer_table_w"]) == "100":
        mean = float(np.mean([s["bn"]["100"]["rate"] for s in cov]))
        lines.append(
            f"BN power at W=100, mean over covariate shifts ≥ 95%: {mean:.1%} — **{'met' if mean >= 0.95 else 'not met'}**"
        )
    if cov:
        mean_worse = [
            w for w in ws if np.mean([c["bn"][w]["rate"] for c in cov]) < np.mean([c["bbsd"][w]["rate"] for c in cov])
        ]
        lines.append(
            "BN power ≥ BBSD power at every W, mean over covariate shifts: "
            + ("**met**" if not mean_worse else f"**not met** at W={', '.join(mean_worse)}")
        )
        worse = []
        for name, r in res["shifts"].items():
            for w in ws:
                bn, bbsd = r["bn"][w], r["bbsd"][w]
                if r["kind"] == "covariate" and bn["rate"] < bbsd["rate"]:
                    # One-sided Fisher exact test: is BBSD's hit count significantly higher than BN's?
                    table = [[bbsd["hits"], bbsd["n"] - bbsd["hits"]], [bn["hits"], bn["n"] - bn["hits"]]]
                    p = fisher_exact(table, alternative="greater").pvalue
                    worse.append(f"{name} W={w} ({bn['rate']:.2f} < {bbsd['rate']:.2f}, p={p:.3f})")
        lines.append(
            "BN power ≥ BBSD power for every covariate shift and W: "
            + (
                "**met**"
                if not worse
                else f"**not met** in {len(worse)} cells (one-sided Fisher p): " + "; ".join(worse)
            )
        )
    return lines


def notes(res: dict[str, Any]) -> list[str]:
    """Where the BN detector is weak at the layer-table W, and structural reasons a shift can be weak or strong."""
    lw, alpha = str(res["layer_table_w"]), res["setup"]["alpha"]
    threshold = res["setup"]["calibration"]["model_threshold"][lw]
    lines = []
    for name, r in res["shifts"].items():
        if r["bn"][lw]["rate"] < 0.95:
            alone = ", ".join(f"{layer} {p:.2f}" for layer, p in r["layers"][lw].items())
            lines.append(f"Weak at W={lw}: {name} — whole model {r['bn'][lw]['rate']:.2f}; each layer alone: {alone}.")
    lines += [
        f"The whole-model statistic fires when some layer's score exceeds {threshold:.2f}× its own {alpha:.0%} threshold "
        f"(the calibrated model threshold at W={lw}): the price of holding the false-alarm rate at α over all layers "
        "together. A shift that only one layer sees is therefore caught less often than that layer alone catches it.",
        "Conv-layer BN statistics average over every pixel position, so they barely see where a digit sits "
        "(translation changes them only through border effects); the BN1d head, whose inputs are position-specific, does.",
        "A label shift changes p(y) and so p(x) = Σ p(x|y) p(y): windows of one or two classes have a different "
        "ink mass and stroke layout from the class mix, which BN layers before the head can see too.",
    ]
    return lines


def markdown(res: dict[str, Any]) -> str:
    s, a = res["setup"], res["artifact"]
    ws = [str(w) for w in s["windows"]]
    out = [
        "# Drift-detection evaluation (Failing Loudly protocol)",
        "",
        f"Model `{a['name']}` {a['version']} (sha256 {a['sha256'][:12]}, test accuracy {a['test_accuracy']}). "
        f"Windows come from the MNIST test split ({s['test_pool']} images); the drift calibration used the "
        f"validation split, so the two are independent. {s['trials']} random windows per shift and W, "
        f"{s['clean_windows']} clean windows per W. False-alarm budget α = {s['alpha']:.2g}.",
        "",
        "- **BN**: whole-model statistic (max over BN layers of score / layer threshold) above the artifact's "
        "calibrated threshold at W.",
        f"- **BBSD**: two-sample KS test on each softmax output of the window against {s['bbsd_reference_size']} "
        "clean validation images drawn afresh per window; Bonferroni: detect if min p < α / 10.",
    ]
    if s["calibration"]["eval_calibrated_windows"]:
        small = ", ".join(str(w) for w in s["calibration"]["eval_calibrated_windows"])
        out.append(
            f"- W={small} is below the artifact's smallest calibrated window ({s['calibration']['artifact_windows'][0]}), "
            "so its BN thresholds were calibrated by this evaluation on the validation split with "
            f"`model.calibration.calibrate` (quantile {s['calibration']['quantile']}, "
            f"{s['calibration']['windows_per_size']} windows), the artifact's own procedure."
        )
    out += ["", "## Power: BN / BBSD (fraction of windows flagged)", ""]
    out.append("| shift | " + " | ".join(f"W={w}" for w in ws) + " |")
    out.append("|---|" + "---|" * len(ws))
    cov = {n: r for n, r in res["shifts"].items() if r["kind"] == "covariate"}
    for name, r in res["shifts"].items():
        out.append(
            f"| {name} | " + " | ".join(f"{r['bn'][w]['rate']:.2f} / {r['bbsd'][w]['rate']:.2f}" for w in ws) + " |"
        )
    if cov:
        means = [
            f"{np.mean([r['bn'][w]['rate'] for r in cov.values()]):.3f} / {np.mean([r['bbsd'][w]['rate'] for r in cov.values()]):.3f}"
            for w in ws
        ]
        out.append("| **mean, covariate** | " + " | ".join(means) + " |")
    fa = res["false_alarm"]
    out.append(
        "| **false alarm, clean** | "
        + " | ".join(f"{fa['bn'][w]['rate']:.3f} / {fa['bbsd'][w]['rate']:.3f}" for w in ws)
        + " |"
    )
    out += [
        "",
        "## False-alarm rate on clean test windows (95% Wilson interval)",
        "",
        "| W | BN | BBSD |",
        "|---|---|---|",
    ]
    for w in ws:
        cells = [
            f"{fa[d][w]['rate']:.2%} ({fa[d][w]['ci95'][0]:.2%}–{fa[d][w]['ci95'][1]:.2%})" for d in ("bn", "bbsd")
        ]
        out.append(f"| {w} | {cells[0]} | {cells[1]} |")
    lw = str(res["layer_table_w"])
    layers = list(fa["layers"][lw])
    out += ["", f"## Which layers catch what: power of each BN layer alone at W={lw}", ""]
    out += ["| shift | " + " | ".join(layers) + " | model |", "|---|" + "---|" * (len(layers) + 1)]
    for name, r in [("clean (false alarm)", fa), *res["shifts"].items()]:
        out.append(
            f"| {name} | "
            + " | ".join(f"{r['layers'][lw][la]:.2f}" for la in layers)
            + f" | {r['bn'][lw]['rate']:.2f} |"
        )
    out += [
        "",
        "## Targets",
        "",
        *[f"- {line}" for line in targets(res)],
        "",
        "## Reading the results",
        "",
        *[f"- {line}" for line in notes(res)],
        "",
        f"Runtime: {res['runtime_seconds']:.0f} s.",
        "",
    ]
    return "\n".join(out)


def plot(res: dict[str, Any], path: Path) -> None:
    """Small multiples: power against W per shift for both detectors, and the clean false-alarm rates."""
    panels = [*res["shifts"].items(), ("clean (false alarm)", res["false_alarm"])]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    ws = res["setup"]["windows"]
    for ax, (name, r) in zip(axes.flat, panels, strict=False):
        for det, style, label in (("bn", "o-", "BN"), ("bbsd", "s--", "BBSD")):
            rates = np.array([r[det][str(w)]["rate"] for w in ws])
            ci = np.array([r[det][str(w)]["ci95"] for w in ws]).T
            ax.errorbar(ws, rates, yerr=np.abs(ci - rates), fmt=style, ms=3, capsize=2, label=label)
        if r is res["false_alarm"]:
            ax.axhline(res["setup"]["alpha"], color="grey", lw=0.8, ls=":", label="α")
            ax.legend(fontsize=7)
            ax.set_ylim(0, max(0.05, 1.3 * float(np.max([r["bbsd"][str(w)]["ci95"][1] for w in ws]))))
        else:
            ax.set_ylim(-0.02, 1.02)
        ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("window size W (images)")
    fig.supylabel("fraction of windows flagged")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or values[0] < 2:
        raise argparse.ArgumentTypeError("window sizes must be integers >= 2")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.drift_eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--artifact", type=Path, default=Path("artifacts/mnist-bn"), help="artifact directory (default: %(default)s)"
    )
    p.add_argument("--trials", type=int, default=None, help="random windows per shift and W (default: 100; --fast: 20)")
    p.add_argument(
        "--windows",
        type=_int_list,
        default=None,
        help="comma-separated window sizes (default: 10,...,1000; --fast: 50,200)",
    )
    p.add_argument(
        "--clean-windows",
        type=int,
        default=None,
        help="clean windows per W for false alarms (default: 1000; --fast 400)",
    )
    p.add_argument(
        "--reference-size", type=int, default=1000, help="BBSD clean reference sample size (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=None, help="MNIST cache directory (default: ./data)")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="output directory (default: %(default)s)")
    p.add_argument(
        "--fast",
        action="store_true",
        help=f"smoke run: shifts {', '.join(FAST_SHIFTS)} on {FAST_POOL} test images",
    )
    args = p.parse_args(argv)
    if args.trials is None:  # windows are cheap once moments exist: 100 trials cost ~5% more than 20
        args.trials = FAST_TRIALS if args.fast else TRIALS
    if args.clean_windows is None:
        args.clean_windows = FAST_CLEAN_WINDOWS if args.fast else CLEAN_WINDOWS
    if args.trials < 1 or args.clean_windows < 1 or args.reference_size < 2:
        p.error("--trials and --clean-windows must be >= 1, --reference-size >= 2")
    args.shifts = FAST_SHIFTS if args.fast else (*covariate_shifts(), *LABEL_SHIFTS)
    args.pool = FAST_POOL if args.fast else None
    if args.windows is None:
        args.windows = FAST_WINDOWS if args.fast else WINDOWS
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    res = evaluate(args)
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(res)
    (args.out / "drift_eval.md").write_text(text)
    (args.out / "drift_eval.json").write_text(json.dumps(res, indent=2) + "\n")
    plot(res, args.out / "drift_eval.png")
    print(text)
    log(f"wrote {args.out}/drift_eval.{{md,json,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
