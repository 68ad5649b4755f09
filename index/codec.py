"""Vector codecs: float vectors <-> compact uint8 codes, through faiss' standalone codecs.

Re-ranking needs every shortlisted item's patch grid, and for a model with a fusion layer its side
states; stored raw they are tens of KB an item (16 pooled 1280-d patches in float16: 40 KB; MiniLM's
states of an average H&M text, 45 word pieces, and 16 patches, 384 values each: 46 KB). A faiss codec
(default `PQ64`: 64 bytes a vector) brings each to 1-4 KB, decoded only for the shortlist.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

from index.factory import MIN_POINTS_PER_CENTROID, PQ_CENTROIDS, sub_indexes

logger = logging.getLogger(__name__)

ENCODE_BLOCK = 256  # vectors per sa_encode call
FALLBACK_CODEC = "SQ8"  # per-dimension 8-bit scalar quantizer: trains on any number of vectors


def train_codec(
    vectors: np.ndarray, factory: str, iterations: int | None = None, what: str = "patch"
) -> tuple[faiss.Index, str]:
    """Train a codec on (n, D) vectors: (codec, the factory string actually used).

    `iterations` sets the PQ codebooks' k-means rounds (faiss' default, 25, when None); `what` names
    the vectors in warnings."""
    assert vectors.ndim == 2 and len(vectors) > 0, "train_codec needs (n, D) vectors"
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if "PQ" in factory and len(vectors) < PQ_CENTROIDS:
        logger.warning(
            "only %d %s vectors: too few to train %s codebooks; using %s",
            len(vectors),
            what,
            factory,
            FALLBACK_CODEC,
        )
        factory = FALLBACK_CODEC
    try:
        codec = faiss.index_factory(vectors.shape[1], factory)
    except RuntimeError as error:
        raise ValueError(
            f"faiss cannot build {what} codec {factory!r} for dimension {vectors.shape[1]}"
        ) from error
    for sub in sub_indexes(codec):
        if isinstance(sub, faiss.IndexPQ):
            sub.do_polysemous_training = False
            if iterations is not None:
                sub.pq.cp.niter = iterations
            if len(vectors) < MIN_POINTS_PER_CENTROID * PQ_CENTROIDS:
                # One warning here instead of faiss printing one per sub-quantizer.
                logger.warning(
                    "%s codec trained on only %d vectors; expect coarser codes", what, len(vectors)
                )
                sub.pq.cp.min_points_per_centroid = 1
    codec.train(vectors)
    return codec, factory


def encode(codec: faiss.Index, vectors: np.ndarray) -> np.ndarray:
    """(..., D) vectors -> (..., code_size) uint8 codes."""
    *shape, dim = vectors.shape
    assert dim == codec.d, f"codec expects {codec.d}-d vectors, got {dim}"
    flat = vectors.reshape(-1, dim)
    codes = np.empty((len(flat), codec.sa_code_size()), dtype=np.uint8)
    for start in range(0, len(flat), ENCODE_BLOCK):
        # faiss PQ builds an (n, M, 256) distance table: small blocks keep it in cache (3-4x faster).
        block = np.ascontiguousarray(flat[start : start + ENCODE_BLOCK], dtype=np.float32)
        codes[start : start + len(block)] = codec.sa_encode(block)
    return codes.reshape(*shape, codec.sa_code_size())


def decode(codec: faiss.Index, codes: np.ndarray) -> np.ndarray:
    """(..., code_size) uint8 codes -> (..., D) float32 vectors."""
    *shape, code_size = codes.shape
    assert code_size == codec.sa_code_size(), (
        f"codec writes {codec.sa_code_size()}-byte codes, got {code_size}"
    )
    flat = np.ascontiguousarray(codes.reshape(-1, code_size), dtype=np.uint8)
    return codec.sa_decode(flat).reshape(*shape, codec.d)


def relative_error(codec: faiss.Index, vectors: np.ndarray) -> float:
    """Mean ||x - decode(encode(x))||^2 / ||x||^2 over vectors: how much of the signal the codes lose."""
    original = np.asarray(vectors, dtype=np.float32)
    decoded = decode(codec, encode(codec, original))
    energy = np.maximum((original**2).sum(-1), 1e-12)
    return float((((original - decoded) ** 2).sum(-1) / energy).mean())
