"""Service configuration: one typed settings class, read from BNSERVE_* environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.wire import EngineName


class Settings(BaseSettings):
    """Every knob of the service. Built explicitly by `create_app(Settings(...))`, never at import time.

    >>> Settings(artifact_dir=Path("artifacts/mnist-bn"), max_batch_size=32)
    """

    # hide_input_in_errors: a refused setting's message must not echo its value (the admin token among them)
    model_config = SettingsConfigDict(env_prefix="BNSERVE_", extra="forbid", frozen=True, hide_input_in_errors=True)

    artifact_dir: Path = Field(Path("artifacts/mnist-bn"), description="artifact directory to serve")
    host: str = Field("127.0.0.1", description="bind address; loopback unless you mean to expose it")
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = Field("info", pattern="^(critical|error|warning|info|debug)$")
    access_log: bool = Field(True, description="one log line per request (method, path, status; never bodies)")

    # Request limits.
    max_instances: int = Field(64, ge=1, description="most images in one request")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="larger bodies get 413")
    max_image_files: int = Field(16, ge=1, description="most files in one image upload")
    max_image_pixels: int = Field(4_000_000, ge=784, description="decompression-bomb guard per image")
    max_header_bytes: int = Field(
        32 * 1024, ge=1024, le=1024 * 1024,
        description="a request line and headers (or a chunked body's trailers) larger than this get 431",
    )  # fmt: skip
    max_upload_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="larger image uploads get 413, as sent and once decompressed"
    )
    read_timeout: float = Field(
        30.0, gt=0.0, le=3600.0,
        description="seconds a request may go without sending a byte of its head or body: then 408, and the "
        "connection closes (a connection that sends no request at all is closed after as long)",
    )  # fmt: skip
    max_connections: int = Field(
        1000, ge=1, description="open connections past this get 503 + Retry-After, and are closed"
    )

    fast_path: bool = Field(
        True, description="serve POST /v1/predict in pure ASGI, past FastAPI's routing (same answers, less CPU)"
    )

    inference_process: bool = Field(
        True, description="run the model in an inference worker process (no GIL shared with HTTP); false: a thread"
    )
    inference_timeout: float = Field(
        30.0, gt=0.0, le=3600.0, description="a worker process silent this long on one call is killed and replaced"
    )

    # Micro-batching.
    max_batch_size: int = Field(32, ge=1, description="most images in one forward pass")
    max_batch_delay: float = Field(0.0, ge=0.0, le=1.0, description="seconds to wait for a fuller batch (0: never)")
    max_batches_in_flight: int = Field(
        2, ge=1, le=4, description="2: the next batch waits at the model while one runs, so the model never idles "
        "between batches; 1: one batch at a time",
    )  # fmt: skip
    max_queue_images: int = Field(2048, ge=1, description="queued images beyond this get 503 + Retry-After")
    request_timeout: float = Field(5.0, gt=0.0, le=300.0, description="seconds before a queued request gets 504")
    torch_threads: int = Field(
        0, ge=0, description="intra-op threads of the model (torch and onnxruntime); 0 = half the cores (the rest "
        "serve HTTP), at least 1",
    )  # fmt: skip
    engine: EngineName = Field(
        "onnxruntime", description="what runs the forward pass: onnxruntime (the network exported from the loaded "
        "weights; faster on CPU) or torch (eager)",
    )  # fmt: skip

    # Drift monitoring.
    drift_enabled: bool = True
    drift_window: int = Field(256, ge=16, le=65536, description="images in the drift window")
    drift_top_channels: int = Field(5, ge=0, le=64)
    drift_sample: float = Field(
        0.05, gt=0.0, le=1.0,
        description="under load, the share of served images the drift window sees (it also sees every image while "
        "it is not full and whenever the worker was idle); 1: every image. Its cost: bench/README.md",
    )  # fmt: skip

    # Admin: routes are disabled (404) unless a token is set.
    admin_token: SecretStr | None = Field(None, description="bearer token for /v1/admin/* and /v1/drift/reset")
    reload_poll_seconds: float = Field(0.0, ge=0.0, description="watch the artifact and reload on change; 0: off")

    @field_validator("admin_token")
    @classmethod
    def _token_strength(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 16:
            raise ValueError("admin_token must be at least 16 characters")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.max_instances > self.max_queue_images:
            raise ValueError("max_instances must be <= max_queue_images, or a full request could never queue")
        return self
