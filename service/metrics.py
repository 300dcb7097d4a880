"""Prometheus metrics of one app, on a registry the app owns (never the global one)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from service.drift_report import DriftReport

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONFIDENCE_BUCKETS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)


@dataclass(frozen=True)
class ModelView:
    """What the collector needs to know about the model being served right now."""

    name: str
    version: str
    sha256: str
    drift: DriftReport | None


class ServingCollector(Collector):
    """Model identity and per-layer drift, computed from the current model at scrape time."""

    def __init__(self, view: Callable[[], ModelView | None]) -> None:
        self._view = view

    def collect(self) -> Iterator[Metric]:
        view = self._view()
        ready = GaugeMetricFamily("bnserve_model_ready", "1 when a model is loaded, warmed up and serving")
        ready.add_metric([], 1.0 if view else 0.0)
        yield ready
        if view is None:
            return
        info = InfoMetricFamily("bnserve_model", "the model being served")
        info.add_metric([], {"name": view.name, "version": view.version, "sha256": view.sha256})
        yield info
        if view.drift is None:
            return
        yield from drift_families(view.drift)


def drift_families(report: DriftReport) -> Iterator[Metric]:
    """Per-layer drift gauges (label `layer` only: no per-channel cardinality) and the whole-model statistic."""
    labels = ["layer"]
    score = GaugeMetricFamily(
        "bnserve_drift_score", "mean KL over channels of the layer's window vs its reference", labels=labels
    )
    threshold = GaugeMetricFamily(
        "bnserve_drift_threshold", "calibrated drift-score threshold for the window size", labels=labels
    )
    shift = GaugeMetricFamily(
        "bnserve_drift_mean_shift", "RMS over channels of the standardised mean shift", labels=labels
    )
    logvar = GaugeMetricFamily(
        "bnserve_drift_log_variance_ratio", "mean over channels of |log variance ratio|", labels=labels
    )
    images = GaugeMetricFamily("bnserve_drift_window_images", "images in the layer's drift window", labels=labels)
    for layer in report.layers:
        images.add_metric([layer.name], layer.images)
        threshold.add_metric([layer.name], layer.threshold)
        if layer.score is not None:
            score.add_metric([layer.name], layer.score)
            shift.add_metric([layer.name], layer.mean_shift_rms)
            logvar.add_metric([layer.name], layer.log_var_ratio_mean_abs)
    yield from (score, threshold, shift, logvar, images)
    size = GaugeMetricFamily("bnserve_drift_window_size", "configured drift window, in images")
    size.add_metric([], report.window)
    warming = GaugeMetricFamily("bnserve_drift_warming_up", "1 until the drift window is full")
    warming.add_metric([], 1.0 if report.warming_up else 0.0)
    model_thr = GaugeMetricFamily("bnserve_drift_model_threshold", "threshold of the whole-model drift statistic")
    model_thr.add_metric([], report.model_threshold)
    images_total = CounterMetricFamily(
        "bnserve_drift_images", "images answered by this model, by whether the drift window saw them "
        "(unmonitored: left out by the drift sampling rule)", labels=["monitored"],
    )  # fmt: skip
    images_total.add_metric(["true"], report.images_seen)
    images_total.add_metric(["false"], report.images_unmonitored)
    yield from (size, warming, model_thr, images_total)
    if report.model_statistic is not None:
        stat = GaugeMetricFamily("bnserve_drift_model_statistic", "max over layers of drift score / layer threshold")
        stat.add_metric([], report.model_statistic)
        yield stat


class Metrics:
    """All metrics of one app instance. Tests read them back with `registry.get_sample_value(...)`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "bnserve_http_requests", "HTTP requests by route template, method and status code",
            ["route", "method", "status"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "bnserve_http_request_duration_seconds", "HTTP request latency by route template, method and status code",
            ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("bnserve_http_requests_in_flight", "HTTP requests being handled", registry=r)
        self.queue_depth = Gauge("bnserve_batch_queue_images", "images waiting for a forward pass", registry=r)
        self.queue_wait = Histogram(
            "bnserve_batch_queue_wait_seconds",
            "time a request waited in the batch queue",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "bnserve_batch_size_images", "images per forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.inference = Histogram(
            "bnserve_inference_duration_seconds", "time of one batched forward pass, drift statistics included",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.rejections = Counter(
            "bnserve_rejections", "requests refused by the server, by reason", ["reason"], registry=r
        )
        self.predictions = Counter("bnserve_predictions", "predicted class of each image", ["class"], registry=r)
        self.confidence = Histogram(
            "bnserve_prediction_confidence",
            "top-class probability of each image",
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.worker_restarts = Counter(
            "bnserve_inference_worker_restarts", "inference worker processes replaced after they died", registry=r
        )
        self.reloads = Counter("bnserve_model_reloads", "model reload attempts by result", ["result"], registry=r)

    def watch(self, view: Callable[[], ModelView | None]) -> None:
        self.registry.register(ServingCollector(view))


class MetricsObserver:
    """Feeds the batcher's events into the app's metrics (implements batching.BatchObserver)."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def queued(self, images: int) -> None:
        self.m.queue_depth.set(images)

    def batch_done(self, images: int, waits: Sequence[float], seconds: float) -> None:
        self.m.batch_size.observe(images)
        for wait in waits:
            self.m.queue_wait.observe(wait)
        self.m.inference.observe(seconds)

    def rejected(self, reason: str) -> None:
        self.m.rejections.labels(reason).inc()
