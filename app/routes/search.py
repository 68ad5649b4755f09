"""POST /search/text and /search/image: validate, call the search service, map to the response schema."""

from __future__ import annotations

import re
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Query

from app.deps import ServiceDep, SettingsDep, require_content_type, require_search_key
from app.errors import ApiError
from app.images import read_upload
from app.retrieval import FILTER_FIELDS, SearchOptions, SearchOutcome, is_filter_field
from app.schemas import (
    ErrorResponse,
    ImageSearchForm,
    ImageSearchOptions,
    IndexInfo,
    ModelInfo,
    SearchResponse,
    SearchResult,
    TextSearchRequest,
    Timings,
)
from app.settings import Settings

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "malformed JSON",
        401: "API key required",
        403: "wrong API key",
        413: "upload over the byte or pixel limit",
        415: "wrong content type, or a file that is not a supported image",
        422: "invalid options, empty or unprintable query, unknown filter, corrupt image",
        503: "model still loading, too many searches in flight (with Retry-After), or a stage failed",
        504: "a stage (decode, encode, recall, re-rank) took longer than its configured limit",
    }.items()
}

router = APIRouter(
    prefix="/search", tags=["search"], dependencies=[Depends(require_search_key)], responses=ERRORS
)


@router.post(
    "/text", dependencies=[Depends(require_content_type("application/json"))], response_model=SearchResponse
)
async def search_text(body: TextSearchRequest, service: ServiceDep, settings: SettingsDep) -> SearchResponse:
    """Find products whose photos match a text query.

    The query is embedded and the image index returns `recall_k` candidates (after `filters`); the
    cross-encoder then reads the query together with each of the best `rerank_k` candidate photos, and
    the page `offset .. offset + k` of that ranking comes back. Queries longer than the model reads are
    truncated; `rerank: false` skips the cross-encoder (fastest, least accurate).
    """
    query = body.query.strip()
    if not query:
        raise ApiError(422, "empty_query", "the query is empty")
    if not is_printable_text(query):
        raise ApiError(
            422, "invalid_query", "the query holds control characters, NUL bytes or unpaired surrogates"
        )
    if len(query) > settings.max_query_chars:
        raise ApiError(
            422,
            "query_too_long",
            f"the query has {len(query)} characters; the limit is {settings.max_query_chars}",
        )
    options = search_options(body.model_dump(exclude={"query"}, exclude_none=True), settings)
    return to_response(await service.search_text(query, options), options)


@router.post(
    "/image",
    dependencies=[Depends(require_content_type("multipart/form-data"))],
    response_model=SearchResponse,
)
async def search_image(
    form: Annotated[ImageSearchForm, Form(media_type="multipart/form-data")],
    params: Annotated[ImageSearchOptions, Query()],
    service: ServiceDep,
    settings: SettingsDep,
) -> SearchResponse:
    """Find products that look like an uploaded photo.

    Send the photo as the multipart field `file`; options go in form fields or query parameters
    (`filters` as a JSON object). The photo is cut into patches and embedded, the text index returns
    `recall_k` candidates, and the cross-encoder reads each of the best `rerank_k` candidates'
    descriptions together with the photo. Animated images are searched by their first frame;
    transparency is composited onto white.
    """
    chosen = {
        **params.model_dump(exclude_unset=True),
        **form.model_dump(exclude_unset=True, exclude={"file"}),
    }
    options = search_options({key: value for key, value in chosen.items() if value is not None}, settings)
    data = await read_upload(form.file, settings.max_upload_bytes)
    return to_response(await service.search_image(data, options), options)


# C0 controls other than tab, newline and carriage return, and DEL: nothing a shopper types.
_CONTROL_CHARACTERS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def is_printable_text(text: str) -> bool:
    """No control characters and valid Unicode throughout (JSON can carry lone surrogates, UTF-8 cannot)."""
    if _CONTROL_CHARACTERS.search(text):
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def search_options(params: dict[str, Any], settings: Settings) -> SearchOptions:
    """Fill unset options with the configured defaults; anything past a configured maximum is a 422."""
    k = params.get("k", settings.default_k)
    recall_k = params.get("recall_k", settings.default_recall_k)
    rerank_k = params.get("rerank_k", settings.default_rerank_k)
    offset = params.get("offset", 0)
    for name, value, maximum in (
        ("k", k, settings.max_k),
        ("recall_k", recall_k, settings.max_recall_k),
        ("rerank_k", rerank_k, settings.max_rerank_k),
        ("offset", offset, settings.max_offset),
    ):
        if value > maximum:
            raise ApiError(
                422, "out_of_range", f"{name} = {value} exceeds this server's maximum of {maximum}"
            )
    filters = params.get("filters") or {}
    unknown = sorted(name for name in filters if not is_filter_field(name))
    if unknown:
        raise ApiError(
            422,
            "unknown_filter",
            f"cannot filter on {unknown}; filterable: {', '.join(FILTER_FIELDS)}, metadata.<field>",
        )
    return SearchOptions(
        k=k,
        offset=offset,
        recall_k=recall_k,
        rerank_k=min(rerank_k, recall_k),  # only recalled candidates can be re-ranked
        rerank=params.get("rerank", True),
        filters=dict(filters),
    )


def to_response(outcome: SearchOutcome, options: SearchOptions) -> SearchResponse:
    results = [
        SearchResult(
            id=hit.item["id"],
            rank=options.offset + position + 1,
            score=hit.score,
            recall_score=hit.recall_score,
            rerank_score=hit.rerank_score,
            title=hit.item.get("title", ""),
            category=hit.item.get("category", ""),
            subcategory=hit.item.get("subcategory", ""),
            image_url=image_url(hit.item["id"]),
        )
        for position, hit in enumerate(outcome.hits)
    ]
    timings = outcome.timings_ms
    return SearchResponse(
        results=results,
        offset=options.offset,
        k=options.k,
        total=outcome.total,
        took_ms=timings["total"],
        timings=Timings(encode=timings["encode"], recall=timings["recall"], rerank=timings["rerank"]),
        model=ModelInfo(**outcome.model),
        index=IndexInfo(**outcome.index),
    )


def image_url(item_id: str) -> str:
    return f"/items/{quote(item_id, safe='')}/image"
