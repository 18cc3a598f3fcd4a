"""Typed, frozen settings for the gateway and the Triton launcher (env prefix `VQS_`).

Built once at the entry point and passed down; nothing else reads the environment.
Nested groups use `__`, e.g. `VQS_DECODE__WORKERS=2`, `VQS_LIMITS__MAX_UPLOAD_BYTES=...`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The source checkout this package runs from (in an installed package: site-packages).
REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY_VARIABLE = "VQS_TRITON__MODEL_REPOSITORY"


def default_model_repository() -> Path:
    """Where the models are when `VQS_TRITON__MODEL_REPOSITORY` is not set.

    From a source checkout, its `model_repository/`; an installed package ships no models, so there
    it is `model_repository/` in the current directory. The launcher refuses a path that is not a
    directory with an error naming the setting.
    """
    checkout = REPO_ROOT / "model_repository"
    if (REPO_ROOT / "pyproject.toml").is_file() and checkout.is_dir():
        return checkout
    return Path.cwd() / "model_repository"


class _Group(BaseModel):
    model_config = ConfigDict(frozen=True)


class TritonSettings(_Group):
    model_repository: Path = Field(default_factory=default_model_repository)
    # 0 = pick a free port at start-up.
    grpc_port: int = 0
    http_port: int = 0
    metrics_port: int = 0
    # Set to use an already running Triton ("host:port", gRPC) instead of launching one.
    url: str | None = None
    startup_timeout_s: float = 120.0
    # A Triton the gateway launched that stays not ready this long (hung) is restarted.
    hung_restart_s: float = Field(120.0, gt=0)
    # A Triton that keeps failing is restarted after 1, 2, 4, ... seconds, at most the max.
    restart_backoff_s: float = Field(1.0, gt=0)
    restart_backoff_max_s: float = Field(30.0, gt=0)
    request_timeout_s: float = 60.0
    # System shared memory for clip batches to a Triton on this host (0: inside the requests).
    shared_memory_mb: int = Field(64, ge=0)


class DecodeSettings(_Group):
    workers: int = Field(2, ge=1)
    # Frames per message from a decode worker for a whole video (streams send smaller ones, see
    # pipeline/stream.py); bounds memory per request. Each message costs the gateway CPU.
    chunk_frames: int = Field(256, ge=8)
    # A worker that produces nothing for this long is killed and the request fails.
    stall_timeout_s: float = 30.0
    decoder_threads: int = Field(1, ge=0)
    # Bytes of decoded frames each worker may send ahead of the consumer (at least 2 chunks).
    ahead_bytes: int = Field(24 * 2**20, ge=1)
    # System shared memory the gateway reads decoded frames into, so the encoder's Triton reads
    # clip batches in place (`triton.SharedFrames`); 0: ordinary memory.
    shared_memory_mb: int = Field(96, ge=0)
    # Target length of the keyframe segments a video is split into across workers.
    segment_frames: int = Field(240, ge=1)
    # A video decoded in one segment takes the idle workers' threads only if its frames have at
    # least this many pixels: handing small frames between decoder threads costs more CPU than
    # it saves time (README, "Speed").
    threads_min_pixels: int = Field(640 * 360, ge=0)
    # The library that decodes videos: PyAV (less CPU per frame, flat memory) or decord, which
    # PyAV then replaces for the inputs below (and continues where decord stops early).
    backend: Literal["pyav", "decord"] = "pyav"
    # With decord: inputs larger than this, or whose header claims more frames, go to PyAV:
    # decord's memory grows with the file, and it sizes a table by the claimed frame count.
    decord_max_bytes: int = Field(96 * 2**20, ge=0)
    decord_max_frames: int = Field(1_000_000, ge=0)
    # A worker is replaced after this many videos or once its RSS passes this (decord leaks).
    recycle_after: int = Field(500, ge=1)
    recycle_rss_mb: float = Field(220.0, gt=0)
    # How long a released worker may take to acknowledge before it is killed.
    release_timeout_s: float = Field(10.0, gt=0)
    # A gap between frame timestamps longer than this is a discontinuity: no samples inside it.
    max_gap_s: float = Field(5.0, gt=0)


class LimitsSettings(_Group):
    max_upload_bytes: int = 256 * 1024 * 1024
    max_duration_s: float = 3600.0
    max_frame_pixels: int = 3840 * 2160
    max_concurrent_requests: int = Field(8, ge=1)
    request_deadline_s: float = 600.0
    # Clips per encoder request: 32 fill one of the decoder's shared-memory slots (a chunk of 256
    # 112 px frames), so a batch joined across chunks is still sent in place (README, "Speed").
    clips_per_batch: int = Field(32, ge=1)
    # Clip batches being encoded at once per request (decoding continues meanwhile).
    encode_inflight: int = Field(4, ge=1)
    # `AnalyzeStream`s open at once (admitted separately from unary requests); one more is refused.
    # Each holds a decode worker while it lasts: below decode.workers (see Settings.capacity_problem);
    # 0 turns streaming off (a gateway with one decode worker).
    max_concurrent_streams: int = Field(1, ge=0)
    # A stream whose client sends nothing for this long is ended with DEADLINE_EXCEEDED.
    stream_idle_s: float = Field(30.0, gt=0)
    # The documented largest chunk of a stream (a larger one is INVALID_ARGUMENT) ...
    stream_max_chunk_bytes: int = Field(1 * 2**20, ge=1024)
    # ... and the fastest a stream is read: a faster sender is slowed (back-pressure), not refused.
    stream_max_bytes_per_s: int = Field(32 * 2**20, ge=1024)
    # Clips per window event when the client does not say, and the most it may ask for.
    stream_window_clips: int = Field(4, ge=1)
    stream_max_window_clips: int = Field(64, ge=1)
    # `realtime` mode: decoded clips waiting for the encoder beyond this drop the oldest.
    stream_pending_clips: int = Field(8, ge=1)
    # `realtime` mode: video more than this far behind both the feed and real time is not decoded
    # (skipped up to a keyframe; its clips are dropped).
    stream_max_lag_s: float = Field(0.5, gt=0)


class SecuritySettings(_Group):
    """Who may call the gateway. With none of TLS, client CA or token set, anyone who can reach the
    port may (the default address is loopback). The gRPC health service is always open."""

    # `uri` sources must resolve under this directory; None disables path sources.
    allowed_root: Path | None = None
    # PEM server certificate (chain) and its private key: set both to serve TLS.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # PEM CA bundle for mutual TLS: client certificates are verified against it, and required
    # unless `tls_require_client_cert` is false (then a client without one is let in).
    tls_client_ca: Path | None = None
    tls_require_client_cert: bool = True
    # Bearer token every RPC but health must carry (`authorization: Bearer <token>`); or a file
    # holding it (read once at start-up, surrounding whitespace ignored). At most one of the two.
    token: SecretStr | None = None
    token_file: Path | None = None
    # Listening on an address other than loopback needs TLS and client authentication (a token or
    # required client certificates); this lets the gateway start without them (a trusted network).
    allow_insecure_public: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> SecuritySettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set both security.tls_cert and security.tls_key, or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("security.tls_client_ca (mutual TLS) needs security.tls_cert and tls_key")
        if self.token is not None and self.token_file is not None:
            raise ValueError("set security.token or security.token_file, not both")
        if self.token is not None and not self.token.get_secret_value().strip():
            raise ValueError("security.token is empty")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="VQS_", env_nested_delimiter="__", frozen=True, hide_input_in_errors=True
    )

    host: str = "127.0.0.1"
    grpc_port: int = 50051
    metrics_port: int = 9090
    default_encoder: str = "s3d"
    log_level: str = "INFO"

    # A factory, not an instance made at import: the repository's default depends on the current directory.
    triton: TritonSettings = Field(default_factory=TritonSettings)
    decode: DecodeSettings = DecodeSettings()
    limits: LimitsSettings = LimitsSettings()
    security: SecuritySettings = SecuritySettings()

    def capacity_problem(self) -> str | None:
        """Why the decode pool cannot honour the admission limits (None: it can). Each admitted
        stream holds a decode worker for its whole life and Analyze needs at least one: with no
        worker left, an admitted call would wait for one, unbounded, instead of being refused."""
        streams, workers = self.limits.max_concurrent_streams, self.decode.workers
        if streams < workers:
            return None
        return (
            f"limits.max_concurrent_streams ({streams}) must be below decode.workers ({workers}): "
            "each stream holds a decode worker while it lasts and Analyze needs one too; raise "
            "VQS_DECODE__WORKERS or lower VQS_LIMITS__MAX_CONCURRENT_STREAMS (0 turns streaming off)"
        )

    @model_validator(mode="after")
    def _capacity(self) -> Settings:
        problem = self.capacity_problem()
        if problem is not None:
            raise ValueError(problem)
        return self
