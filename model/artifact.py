"""The self-describing model artifact: model.safetensors (weights + BN buffers) and model.json (everything else)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from model.calibration import Calibration
from model.net import NetConfig, bn_layers, build_net
from model.preprocess import Normalization

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
MAX_META_BYTES = 16 * 1024 * 1024


class ArtifactError(RuntimeError):
    """The artifact is missing, malformed, tampered with or incompatible. The message says which."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    shape: tuple[int, int, int] = (1, 28, 28)
    pixel_range: tuple[float, float] = (0.0, 1.0)
    mean: float
    std: float


class WeightsSpec(_Strict):
    file: str = WEIGHTS_FILE
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class DataSpec(_Strict):
    fingerprint: str
    source: str


class ArtifactMeta(_Strict):
    """The validated contents of model.json."""

    format_version: int
    name: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=128)
    created_at: str
    architecture: dict[str, Any]
    input: InputSpec
    class_names: list[str]
    metrics: dict[str, float]
    data: DataSpec
    training: dict[str, Any] = Field(default_factory=dict)
    drift_calibration: dict[str, Any] | None = None
    weights: WeightsSpec


@dataclass(frozen=True)
class Artifact:
    """A loaded, verified model in eval mode, with its metadata.

    >>> art = load_artifact(Path("artifacts/mnist-bn"))
    >>> art.net.training
    False
    >>> art.meta.version, art.sha256[:12]
    """

    net: nn.Module
    config: NetConfig
    meta: ArtifactMeta
    normalization: Normalization
    calibration: Calibration | None
    path: Path

    @property
    def sha256(self) -> str:
        return self.meta.weights.sha256


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_artifact(
    out_dir: Path,
    net: nn.Module,
    config: NetConfig,
    *,
    name: str,
    normalization: Normalization,
    metrics: dict[str, float],
    data_fingerprint: str,
    data_source: str,
    class_names: list[str] | None = None,
    training: dict[str, Any] | None = None,
    calibration: Calibration | None = None,
    version: str | None = None,
) -> ArtifactMeta:
    """Write the artifact directory atomically (a reader never sees half of it) and return its metadata."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        # One metadata key only: safetensors writes metadata from a hash map, so two keys come out in a random order
        # and the same weights would get a different SHA-256 from run to run.
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        digest = sha256_file(tmp / WEIGHTS_FILE)
        now = datetime.now(UTC)
        meta = ArtifactMeta(
            format_version=FORMAT_VERSION,
            name=name,
            version=version or f"{now:%Y%m%dT%H%M%SZ}-{digest[:8]}",
            created_at=now.isoformat(),
            architecture=config.to_dict(),
            input=InputSpec(mean=normalization.mean, std=normalization.std),
            class_names=class_names or [str(i) for i in range(config.num_classes)],
            metrics=metrics,
            data=DataSpec(fingerprint=data_fingerprint, source=data_source),
            training=training or {},
            drift_calibration=calibration.to_dict() if calibration else None,
            weights=WeightsSpec(sha256=digest),
        )
        (tmp / META_FILE).write_text(meta.model_dump_json(indent=2) + "\n")
        old = out_dir.with_name(f".{out_dir.name}.old")
        if out_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def read_meta(path: Path) -> ArtifactMeta:
    """Parse and validate model.json of an artifact directory."""
    meta_path = Path(path) / META_FILE
    try:
        if meta_path.stat().st_size > MAX_META_BYTES:
            raise ArtifactError(f"{meta_path} is larger than {MAX_META_BYTES} bytes")
        raw = json.loads(meta_path.read_bytes())
    except FileNotFoundError:
        raise ArtifactError(f"no {META_FILE} in {path}: is this an artifact directory?") from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{meta_path} is not readable JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format_version") != FORMAT_VERSION:
        found = raw.get("format_version") if isinstance(raw, dict) else None
        raise ArtifactError(f"{meta_path}: format_version {found!r} is not supported (expected {FORMAT_VERSION})")
    try:
        return ArtifactMeta.model_validate(raw)
    except ValidationError as exc:
        raise ArtifactError(f"{meta_path} is invalid: {exc}") from None


def load_artifact(path: Path) -> Artifact:
    """Load and verify an artifact: format version, weights hash, config, exact tensor set; returns it in eval mode.

    Weights are read with safetensors, never unpickled.
    """
    path = Path(path)
    meta = read_meta(path)
    if Path(meta.weights.file).name != meta.weights.file:
        raise ArtifactError(f"weights file name {meta.weights.file!r} must not contain a path")
    weights = path / meta.weights.file
    try:  # read once: the bytes that are hashed are the bytes that are loaded, whatever happens to the file
        blob = weights.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"weights file {weights} is missing") from None
    except OSError as exc:
        raise ArtifactError(f"weights file {weights} is not readable: {exc}") from None
    actual = hashlib.sha256(blob).hexdigest()
    if actual != meta.weights.sha256:
        raise ArtifactError(
            f"weights hash mismatch for {weights}: model.json says {meta.weights.sha256[:16]}…, "
            f"file has {actual[:16]}… (tampered or partially written)"
        )
    try:
        config = NetConfig.from_dict(meta.architecture)
        normalization = Normalization(meta.input.mean, meta.input.std)
        calibration = Calibration.from_dict(meta.drift_calibration) if meta.drift_calibration else None
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{path / META_FILE}: invalid architecture, input or calibration: {exc}") from None
    if len(meta.class_names) != config.num_classes:
        raise ArtifactError(f"{len(meta.class_names)} class names for {config.num_classes} classes")
    net = build_net(config)
    try:
        state = load_safetensors(blob)
        net.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise ArtifactError(f"weights in {weights} do not match the architecture: {exc}") from None
    for name, bn in bn_layers(net).items():
        var = bn.running_var
        if bn.running_mean is None or var is None or not bool(torch.isfinite(var).all()) or bool((var < 0).any()):
            raise ArtifactError(f"BN layer {name} has missing or invalid running statistics")
    if calibration is not None and set(calibration.layer_thresholds) != set(bn_layers(net)):
        raise ArtifactError("drift calibration does not cover exactly the network's BN layers")
    net.eval()
    return Artifact(net=net, config=config, meta=meta, normalization=normalization, calibration=calibration, path=path)
