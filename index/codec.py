"""Patch-feature codec: (N, D) float patches per item <-> compact uint8 codes, through faiss' standalone codecs.

Re-ranking needs every shortlisted item's patch grid; stored raw it is 40 KB an item (16 pooled 1280-d
patches in float16). A faiss codec (default `PQ64`: 64 bytes a patch) brings that to 1 KB, decoded only
for the shortlist.
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

from index.factory import MIN_POINTS_PER_CENTROID, PQ_CENTROIDS, sub_indexes

logger = logging.getLogger(__name__)

ENCODE_BLOCK = 256  # patch vectors per sa_encode call
FALLBACK_CODEC = "SQ8"  # per-dimension 8-bit scalar quantizer: trains on any number of vectors


def train_codec(patch_vectors: np.ndarray, factory: str) -> tuple[faiss.Index, str]:
    """Train the codec on (n, D) patch vectors: (codec, the factory string actually used)."""
    assert patch_vectors.ndim == 2 and len(patch_vectors) > 0, "train_codec needs (n, D) patch vectors"
    vectors = np.ascontiguousarray(patch_vectors, dtype=np.float32)
    if "PQ" in factory and len(vectors) < PQ_CENTROIDS:
        logger.warning(
            "only %d patch vectors: too few to train %s codebooks; using %s",
            len(vectors),
            factory,
            FALLBACK_CODEC,
        )
        factory = FALLBACK_CODEC
    try:
        codec = faiss.index_factory(vectors.shape[1], factory)
    except RuntimeError as error:
        raise ValueError(
            f"faiss cannot build patch codec {factory!r} for dimension {vectors.shape[1]}"
        ) from error
    for sub in sub_indexes(codec):
        if isinstance(sub, faiss.IndexPQ):
            sub.do_polysemous_training = False
            if len(vectors) < MIN_POINTS_PER_CENTROID * PQ_CENTROIDS:
                # One warning here instead of faiss printing one per sub-quantizer.
                logger.warning("patch codec trained on only %d vectors; expect coarser codes", len(vectors))
                sub.pq.cp.min_points_per_centroid = 1
    codec.train(vectors)
    return codec, factory


def encode_patches(codec: faiss.Index, patch_features: np.ndarray) -> np.ndarray:
    """(n, N, D) patch features -> (n, N, code_size) uint8 codes."""
    n, patches, dim = patch_features.shape
    assert dim == codec.d, f"codec expects {codec.d}-d patches, got {dim}"
    flat = patch_features.reshape(n * patches, dim)
    codes = np.empty((n * patches, codec.sa_code_size()), dtype=np.uint8)
    for start in range(0, len(flat), ENCODE_BLOCK):
        # faiss PQ builds an (n, M, 256) distance table: small blocks keep it in cache (3-4x faster).
        block = np.ascontiguousarray(flat[start : start + ENCODE_BLOCK], dtype=np.float32)
        codes[start : start + len(block)] = codec.sa_encode(block)
    return codes.reshape(n, patches, codec.sa_code_size())


def decode_patches(codec: faiss.Index, codes: np.ndarray) -> np.ndarray:
    """(n, N, code_size) uint8 codes -> (n, N, D) float32 patch features."""
    n, patches, code_size = codes.shape
    assert code_size == codec.sa_code_size(), (
        f"codec writes {codec.sa_code_size()}-byte codes, got {code_size}"
    )
    flat = np.ascontiguousarray(codes.reshape(n * patches, code_size), dtype=np.uint8)
    return codec.sa_decode(flat).reshape(n, patches, codec.d)


def relative_error(codec: faiss.Index, patch_features: np.ndarray) -> float:
    """Mean ||x - decode(encode(x))||^2 / ||x||^2 over patches: how much of the signal the codes lose."""
    original = np.asarray(patch_features, dtype=np.float32)
    decoded = decode_patches(codec, encode_patches(codec, original))
    energy = np.maximum((original**2).sum(-1), 1e-12)
    return float((((original - decoded) ** 2).sum(-1) / energy).mean())
