"""Settings: the one place the service reads its environment (`FASHIONBERT_*` variables and `.env`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the search service can be told; every field is `FASHIONBERT_<NAME>` in the environment."""

    model_config = SettingsConfigDict(
        env_prefix="FASHIONBERT_", env_file=".env", extra="ignore", protected_namespaces=()
    )

    # What to serve.
    model_dir: Path | None = None  # FashionBERT checkpoint folder
    index_dir: Path | None = None  # index bundle folder (`fashionbert index build`)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Hold the model's weights in bf16: half the memory, scores within ~0.05 of bf16 autocast over fp32
    # weights with the same top 10, re-ranking 1.0-1.08x as fast on a quiet CPU
    # (benchmarks/rerank_speed.py). False: autocast over fp32 weights. Either way only where the device
    # computes bf16 natively (AMX, AVX-512 BF16, CUDA); elsewhere the model runs fp32 (model/precision.py).
    bf16_weights: bool = True
    # Re-rank through an int8 copy of the encoder layers (CPU only; GPUs keep bf16); see README figures.
    int8_matching: bool = False
    verify_checksums: bool = True  # hash the bundle's arrays when opening it (slower start, no silent rot)
    nprobe: int | None = Field(default=None, ge=1)  # IVF lists probed per query; None = the bundle's choice
    warm_up: bool = True  # one text and one image search through the whole path before /readyz says ready
    torch_threads: int | None = Field(default=None, ge=1)
    # faiss' OpenMP threads per index call (recall, patch decoding). One: a query's search takes about a
    # millisecond, and more threads spin-wait after it on the cores the model thread's next call needs.
    faiss_threads: int = Field(default=1, ge=1)
    # Threads that run index calls (recall, stored states, bundle opening). A call takes about a
    # millisecond, so a few serve any concurrency; more only help with many slow filters or a slow disk.
    index_threads: int = Field(default=4, ge=1)
    # A bundle or model that fails to load: False keeps the process up with /readyz 503 and the reason;
    # True makes start-up fail so the process exits non-zero (for supervisors that restart or alert).
    exit_on_startup_error: bool = False
    # Seconds `fashionbert serve` lets in-flight requests finish after SIGTERM before closing them.
    shutdown_timeout_s: float = Field(default=30.0, gt=0)

    # Search options: defaults a request gets when it says nothing, maxima it may not exceed.
    default_k: int = Field(default=10, ge=1)
    max_k: int = Field(default=100, ge=1)
    max_offset: int = Field(default=1000, ge=0)
    default_recall_k: int = Field(default=200, ge=1)
    max_recall_k: int = Field(default=2000, ge=1)
    default_rerank_k: int = Field(default=50, ge=0)
    max_rerank_k: int = Field(default=500, ge=0)
    # Hard cap on query characters: longer is a 422; shorter but past the model's tokens is truncated.
    max_query_chars: int = Field(default=2000, ge=1)

    # Request size limits.
    max_upload_bytes: int = Field(default=10 * 2**20, ge=1)
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    max_json_bytes: int = Field(default=64 * 2**10, ge=1)

    # Access. No key configured = that part of the API is open (search) or switched off (admin).
    admin_api_key: SecretStr | None = None
    search_api_key: SecretStr | None = None
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Folders /admin/reload may open bundles from (comma-separated); empty = the folder holding index_dir.
    bundle_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)

    # Re-ranking micro-batches and back-pressure.
    batch_window_ms: float = Field(default=2.0, ge=0.0)
    max_batch_pairs: int = Field(default=256, ge=1)
    max_queue_depth: int = Field(default=64, ge=1)  # searches in flight beyond this get 503

    # Per-stage time limits: a stage past its limit answers 504, so one stuck request cannot hold a client.
    decode_timeout_s: float = Field(default=10.0, gt=0)  # decoding an uploaded image
    stage_timeout_s: float = Field(default=30.0, gt=0)  # each of encode, recall and re-rank
    # A model call past this is abandoned and the next starts on a spare thread (see app.model_lane); past
    # `max_abandoned_model_calls` still running, searches get 503 and /readyz says not ready.
    model_call_timeout_s: float = Field(default=10.0, gt=0)
    max_abandoned_model_calls: int = Field(default=2, ge=0)

    @field_validator("cors_origins", "bundle_roots", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        # `FASHIONBERT_CORS_ORIGINS=https://a.example,https://b.example` reads as a list.
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def reload_roots(self) -> list[Path]:
        """Where reloads may read bundles from; empty (anywhere) only when nothing is configured."""
        if self.bundle_roots:
            return [root.resolve() for root in self.bundle_roots]
        return [self.index_dir.resolve().parent] if self.index_dir is not None else []

    @model_validator(mode="after")
    def _defaults_within_maxima(self) -> Settings:
        for name in ("k", "recall_k", "rerank_k"):
            default, maximum = getattr(self, f"default_{name}"), getattr(self, f"max_{name}")
            if default > maximum:
                raise ValueError(f"default_{name} ({default}) exceeds max_{name} ({maximum})")
        return self
