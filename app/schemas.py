"""Request and response bodies of the HTTP API (pydantic v2); these are what /docs shows."""

from __future__ import annotations

from typing import Any

from fastapi import UploadFile
from pydantic import BaseModel, ConfigDict, Field, Json


class _SearchOptions(BaseModel):
    """Options shared by text and image search. Unset fields take the server's configured defaults."""

    model_config = ConfigDict(extra="forbid")

    k: int | None = Field(
        default=None, ge=1, description="results per page (default and maximum are configured)"
    )
    offset: int = Field(default=0, ge=0, description="skip this many ranked results (pagination)")
    rerank: bool = Field(default=True, description="re-rank with the cross-encoder; false = embeddings only")
    recall_k: int | None = Field(default=None, ge=1, description="candidates taken from the embedding index")
    rerank_k: int | None = Field(
        default=None, ge=0, description="how many of the best recall candidates the cross-encoder scores"
    )


class TextSearchRequest(_SearchOptions):
    query: str = Field(description="what the shopper typed", examples=["black high-waisted jeans"])
    filters: dict[str, str] | None = Field(
        default=None,
        description="exact-match filters: `category`, `subcategory`, `group` or `metadata.<field>`",
        examples=[{"category": "Garment Upper body"}],
    )


class ImageSearchOptions(_SearchOptions):
    """Image search options, as query parameters or form fields (a form field wins over a parameter)."""

    filters: Json[dict[str, str]] | None = Field(
        default=None,
        description='exact-match filters as a JSON object, e.g. `{"category": "Shoes"}` (fields as for text)',
    )


class ImageSearchForm(ImageSearchOptions):
    file: UploadFile = Field(description="the query photo: JPEG, PNG, WebP, GIF (first frame), BMP or TIFF")


class SearchResult(BaseModel):
    id: str
    rank: int = Field(description="1-based position in the full ranking (offset included)")
    score: float = Field(description="the ranking score: `rerank_score` when re-ranked, else `recall_score`")
    recall_score: float = Field(description="cosine similarity of the query and item embeddings")
    rerank_score: float | None = Field(description="cross-encoder alignment logit; null if not re-ranked")
    title: str
    category: str
    subcategory: str
    image_url: str


class Timings(BaseModel):
    """Milliseconds spent in each stage of this search."""

    encode: float
    recall: float
    rerank: float


class ModelInfo(BaseModel):
    fingerprint: str = Field(description="prefix of the sha256 of the checkpoint's weights")
    device: str
    precision: str = Field(
        description="the model's arithmetic: bf16 where the device computes it natively, else fp32"
    )


class IndexInfo(BaseModel):
    version: str
    items: int


class SearchResponse(BaseModel):
    results: list[SearchResult]
    offset: int
    k: int
    total: int = Field(description="ranked candidates available for paging (at most recall_k)")
    took_ms: float
    timings: Timings
    model: ModelInfo
    index: IndexInfo


class Item(BaseModel):
    id: str
    title: str
    text: str
    category: str
    subcategory: str
    image_url: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    model: ModelInfo
    index: IndexInfo


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: str | None = Field(
        default=None, description="bundle folder to serve; default: the current one, re-read"
    )


class ReloadResponse(BaseModel):
    previous: IndexInfo
    index: IndexInfo
    took_ms: float


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable error code", examples=["invalid_request"])
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
