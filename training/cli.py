"""`python -m training`: train a BN MNIST classifier, re-estimate BN statistics, calibrate drift, write the artifact."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.artifact import save_artifact
from model.bnstats import layer_references
from model.calibration import CALIBRATION_WINDOWS, calibrate
from model.net import ARCHS, NetConfig, build_net
from model.preprocess import Normalization
from training import plots
from training.calibrate import collect_moments
from training.data import DataUnavailableError, MnistSplits, default_cache_dir, load_mnist
from training.loop import evaluate, reestimate_bn, train_one_epoch

logger = logging.getLogger("training")

# --smoke: a real but tiny run (seconds on a CPU) for tests; calibration still needs ≥ 1024 held-out images.
SMOKE_SIZES = {"train": 3000, "val": 2048, "test": 2000}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--arch", choices=ARCHS, default="bn-cnn", help="bn-cnn, or the seed document's MLP")
    p.add_argument("--epochs", type=int, default=7, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=128, help="images per optimiser step")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="AdamW decoupled weight decay")
    p.add_argument("--label-smoothing", type=float, default=0.05, help="cross-entropy label smoothing")
    p.add_argument("--max-shift", type=int, default=2, help="random translation augmentation, in pixels")
    p.add_argument("--seed", type=int, default=1, help="seed for weights, shuffling and augmentation")
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="auto: CUDA, then MPS, then CPU"
    )
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch; 0 = torch's default")
    p.add_argument("--out", type=Path, default=Path("artifacts/mnist-bn"), help="artifact directory")
    p.add_argument("--name", default="mnist-bn", help="model name recorded in the artifact")
    p.add_argument("--version", default=None, help="model version (default: timestamp + weights hash)")
    p.add_argument(
        "--data-dir", type=Path, default=None, help="MNIST cache directory (default: $BNSERVE_DATA_DIR or ./data)"
    )
    p.add_argument("--idx-dir", type=Path, default=None, help="directory holding standard MNIST IDX files")
    p.add_argument(
        "--calibration-windows",
        type=int,
        default=5000,
        help="random clean windows per window size (and again for the model threshold)",
    )
    p.add_argument("--quantile", type=float, default=0.99, help="threshold quantile: false-alarm rate = 1 - q")
    p.add_argument("--smoke", action="store_true", help="tiny, fast run on a subset, for tests")
    args = p.parse_args(argv)
    for flag in ("epochs", "batch_size"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be > 0")
    if args.lr <= 0:
        p.error("--lr must be > 0")
    return args


def pick_device(requested: str) -> torch.device:
    """`auto` prefers CUDA, then Apple MPS, then the CPU; an explicit device must be available."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda requested but CUDA is not available")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("error: --device mps requested but MPS is not available")
    return torch.device(requested)


@dataclass(frozen=True)
class Tensors:
    """Normalised image tensors (N, 1, 28, 28) and int64 labels, one per split, on the CPU."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @staticmethod
    def build(splits: MnistSplits, norm: Normalization, smoke: bool) -> Tensors:
        def prep(x: np.ndarray, y: np.ndarray, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = (x[:n], y[:n]) if n else (x, y)
            images = torch.from_numpy(x).float().div_(255.0).unsqueeze(1)
            return norm.apply(images), torch.from_numpy(y)

        sizes = SMOKE_SIZES if smoke else {}
        return Tensors(
            *prep(splits.train_x, splits.train_y, sizes.get("train")),
            *prep(splits.val_x, splits.val_y, sizes.get("val")),
            *prep(splits.test_x, splits.test_y, sizes.get("test")),
        )


def normalization_of(train_x: np.ndarray) -> Normalization:
    """Mean and std of the training pixels on the [0, 1] scale."""
    unit = train_x.astype(np.float64) / 255.0
    return Normalization(mean=round(float(unit.mean()), 6), std=round(float(unit.std()), 6))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)  # same seed, same thread count → same weights
    if args.smoke:
        args.epochs = min(args.epochs, 2)
        args.calibration_windows = min(args.calibration_windows, 1000)
    try:
        splits = load_mnist(args.data_dir or default_cache_dir(), args.idx_dir)
    except DataUnavailableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    norm = normalization_of(splits.train_x)
    data = Tensors.build(splits, norm, args.smoke)
    config = NetConfig.seed_mlp() if args.arch == "seed-mlp" else NetConfig()
    net = build_net(config).to(device)
    net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # faster convs on CPU
    logger.info(
        "device %s, %d parameters, %d training images",
        device,
        sum(p.numel() for p in net.parameters()),
        len(data.train_x),
    )

    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = -(-len(data.train_x) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.25
    )
    use_fp16_scaler = device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda") if use_fp16_scaler else None
    generator = torch.Generator().manual_seed(args.seed)
    background = float(norm.apply(torch.zeros(())))
    history: list[dict[str, Any]] = []
    train_started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        train_loss = train_one_epoch(
            net, data.train_x, data.train_y,
            optimizer=optimizer, scheduler=scheduler, batch_size=args.batch_size, generator=generator,
            max_shift=args.max_shift, fill=background, label_smoothing=args.label_smoothing, scaler=scaler,
            desc=f"epoch {epoch}/{args.epochs}",
        )  # fmt: skip
        val = evaluate(net, data.val_x, data.val_y)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val.loss, "val_accuracy": val.accuracy})
        logger.info(
            "epoch %d: train loss %.4f, val loss %.4f, val accuracy %.2f%%",
            epoch,
            train_loss,
            val.loss,
            100 * val.accuracy,
        )
    train_seconds = time.perf_counter() - train_started

    reestimate_bn(net, data.train_x)
    val = evaluate(net, data.val_x, data.val_y)
    test = evaluate(net, data.test_x, data.test_y)
    logger.info(
        "after BN re-estimation: val accuracy %.2f%%, test accuracy %.2f%% (loss %.4f)",
        100 * val.accuracy,
        100 * test.accuracy,
        test.loss,
    )

    net = net.to("cpu")
    net = net.to(memory_format=torch.contiguous_format)
    moments = collect_moments(net, data.val_x)
    calibration = calibrate(
        moments, layer_references(net),
        window_sizes=CALIBRATION_WINDOWS, windows_per_size=args.calibration_windows, quantile=args.quantile, seed=args.seed,
    )  # fmt: skip
    metrics = {
        "test_accuracy": test.accuracy,
        "test_loss": test.loss,
        "val_accuracy": val.accuracy,
        "val_loss": val.loss,
    }
    training_info = {
        "arch": args.arch, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "weight_decay": args.weight_decay, "label_smoothing": args.label_smoothing, "max_shift": args.max_shift,
        "seed": args.seed, "device": str(device), "smoke": args.smoke, "train_seconds": round(train_seconds, 2),
        "torch": torch.__version__, "python": platform.python_version(), "bn_reestimated": True,
        "train_images": len(data.train_x),
    }  # fmt: skip
    meta = save_artifact(
        args.out, net, config,
        name=args.name, version=args.version, normalization=norm, metrics=metrics,
        data_fingerprint=splits.fingerprint(), data_source=splits.source,
        training=training_info, calibration=calibration,
    )  # fmt: skip
    classes = meta.class_names
    plots.learning_curves(history, args.out / "learning_curves.png")
    cm = plots.confusion_matrix(
        data.test_y.numpy(), test.predictions, classes, args.out / "confusion_matrix.png",
        title=f"Test set confusion matrix, accuracy {100 * test.accuracy:.2f}%",
    )  # fmt: skip
    plots.calibration_plot(calibration, args.out / "drift_calibration.png")
    total_seconds = time.perf_counter() - started
    report = {
        "name": meta.name, "version": meta.version, "sha256": meta.weights.sha256, "metrics": metrics,
        "history": history, "confusion_matrix": cm.tolist(), "training": training_info,
        "total_seconds": round(total_seconds, 2), "data_source": splits.source,
    }  # fmt: skip
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"wrote {args.out} (version {meta.version}): test accuracy {100 * test.accuracy:.2f}%, "
        f"training {train_seconds:.1f}s, total {total_seconds:.1f}s"
    )
    return 0
