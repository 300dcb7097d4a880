"""Where the served forward pass runs: onnxruntime (the default) or torch eager, behind one small interface.

Both run the same eval-mode network, its BN layers folded into the convolutions before it (model.net.fold_batchnorm),
with the input normalisation and the softmax inside. Both can also give, from the same pass, the per-image moments
of every BN layer's input that the drift monitor needs (model.bnstats.Moments).

onnxruntime runs the network torch.onnx exports from the loaded weights (at load time: the artifact stays the
single source of truth, and nothing is unpickled), several times faster than torch eager on CPU at small batches
(bench/HISTORY.md). For drift it runs a second graph that also computes, per image and channel, Σ(y − c) and Σ(y − c)² of what each BN
layer's hooks would see (model.bnstats.per_image_moments does the same in torch, float32 like here): a few
reductions in C++ in the same pass, and (N, C) outputs, instead of activation-sized ones and ~50 torch calls.
"""

from __future__ import annotations

import io
import warnings
from abc import ABC, abstractmethod

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from model.bnstats import BnStatsRecorder, Moments
from service.wire import ENGINES, EngineName

ONNX_OPSET = 17


class Engine(ABC):
    """One loaded network's forward pass: (N, 1, 28, 28) float32 pixels in [0, 1] → (N, classes) probabilities."""

    name: EngineName

    @abstractmethod
    def forward(self, pixels: np.ndarray) -> np.ndarray:
        """The probabilities, float32."""

    @abstractmethod
    def forward_with_moments(self, pixels: np.ndarray) -> tuple[np.ndarray, dict[str, Moments]]:
        """The probabilities and, by BN layer name, the per-image moments of the layer's input, from one pass."""


def normalise(pixels: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return (pixels - mean) / std


class TorchEngine(Engine):
    """torch eager, channels-last: the fallback (`BNSERVE_ENGINE=torch`), and the reference the onnxruntime engine
    is checked against. Moments come from the recorder's hooks, during the forward pass."""

    name: EngineName = "torch"

    def __init__(self, net: nn.Module, mean: float, std: float, recorder: BnStatsRecorder | None) -> None:
        self._net, self._mean, self._std, self._recorder = net, mean, std, recorder

    def forward(self, pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(pixels)  # shares memory: no copy
        with torch.inference_mode():
            x = normalise(x, self._mean, self._std).contiguous(memory_format=torch.channels_last)
            return torch.softmax(self._net(x), dim=1).numpy()

    def forward_with_moments(self, pixels: np.ndarray) -> tuple[np.ndarray, dict[str, Moments]]:
        if self._recorder is None:
            raise RuntimeError("this engine was built without a drift recorder")
        with self._recorder.capture() as moments:
            probs = self.forward(pixels)
        return probs, moments


class _Exported(nn.Module):
    """What is exported: normalisation, the network and softmax; then each tapped layer's per-image sums."""

    def __init__(self, net: nn.Module, mean: float, std: float, sums: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.net, self.mean, self.std, self.sums = net, mean, std, sums

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.sums.clear()
        probs = torch.softmax(self.net(normalise(x, self.mean, self.std)), dim=1)
        return (probs, *(s for pair in self.sums.values() for s in pair))


def export_onnx(
    net: nn.Module, mean: float, std: float, recorder: BnStatsRecorder | None = None
) -> tuple[bytes, dict[str, int]]:
    """The eval-mode network as an ONNX model: input "pixels" (N, 1, 28, 28), output "probabilities" (N, classes)
    and, with a recorder, "<layer>.s1" and "<layer>.s2" (N, C) for each of its layers in forward order: the sums over
    each image's positions of (y − c) and (y − c)², y what the layer's hooks see and c `recorder.centre`. N is
    dynamic. Also, by layer, how many positions each image's sums are over (H·W of a (N, C, H, W) input, 1 of a
    (N, C) one), as the trace saw them."""
    layers = list(recorder.references) if recorder else []
    modules = dict(net.named_modules())
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    per_image: dict[str, int] = {}

    def tap(name: str, x: torch.Tensor) -> None:
        assert recorder is not None
        per_image[name] = x[0, 0].numel()
        centred = x - recorder.centre(name)
        squared = centred * centred
        sums[name] = (centred.sum((2, 3)), squared.sum((2, 3))) if x.dim() == 4 else (centred, squared)

    handles = [modules[n].register_forward_pre_hook(lambda _m, args, n=n: tap(n, args[0])) for n in layers]
    outputs = ["probabilities", *(f"{n}.{s}" for n in layers for s in ("s1", "s2"))]
    buf = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice and tracer warnings
            torch.onnx.export(
                # eval: the exporter restores the wrapper's mode afterwards, and with it the network's
                _Exported(net, mean, std, sums).eval(),
                (torch.zeros(2, 1, 28, 28),),
                buf,  # type: ignore[arg-type]  # the TorchScript exporter writes to file objects too
                input_names=["pixels"],
                output_names=outputs,
                dynamic_axes={name: {0: "batch"} for name in ("pixels", *outputs)},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
    finally:
        for handle in handles:
            handle.remove()
    if list(sums) != layers:
        raise RuntimeError(f"the export saw BN layers {list(sums)}, expected {layers}")
    return buf.getvalue(), per_image


def _session(model: bytes, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # idle intra-op threads sleep: spinning ones starve the event loop on a small box, as torch's did
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class OrtEngine(Engine):
    """onnxruntime on the CPU: a plain graph, and one that also computes the drift sums. Two graphs, because a
    tensor the sums read cannot be fused into the ReLU after it: the plain one keeps that fusion for the batches
    the drift sampling rule leaves out."""

    name: EngineName = "onnxruntime"

    def __init__(self, net: nn.Module, mean: float, std: float, recorder: BnStatsRecorder | None, threads: int):
        self._recorder = recorder
        self._plain = _session(export_onnx(net, mean, std)[0], threads)
        self._monitored: ort.InferenceSession | None = None
        self._per_image: dict[str, int] = {}  # positions per image and channel of each layer's input
        if recorder is not None:
            monitored, self._per_image = export_onnx(net, mean, std, recorder)
            self._monitored = _session(monitored, threads)

    def forward(self, pixels: np.ndarray) -> np.ndarray:
        return self._plain.run(["probabilities"], {"pixels": np.ascontiguousarray(pixels, np.float32)})[0]

    def forward_with_moments(self, pixels: np.ndarray) -> tuple[np.ndarray, dict[str, Moments]]:
        if self._monitored is None or self._recorder is None:
            raise RuntimeError("this engine was built without a drift recorder")
        probs, *sums = self._monitored.run(None, {"pixels": np.ascontiguousarray(pixels, np.float32)})
        moments = {
            name: self._recorder.moments_from_sums(name, sums[2 * i], sums[2 * i + 1], self._per_image[name])
            for i, name in enumerate(self._recorder.references)  # the graph's outputs are in this order
        }
        return probs, moments


def build_engine(
    name: EngineName, net: nn.Module, mean: float, std: float, recorder: BnStatsRecorder | None, *, threads: int
) -> Engine:
    """The engine `name` for an eval-mode (folded) network, with drift moments for the recorder's layers."""
    if name == "torch":
        return TorchEngine(net, mean, std, recorder)
    if name == "onnxruntime":
        return OrtEngine(net, mean, std, recorder, threads)
    raise ValueError(f"unknown engine {name!r}; one of {ENGINES}")
