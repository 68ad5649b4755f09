"""Recall indexes: the faiss factory string for a catalogue size, then training and filling (GPU when present).

Both recall indexes hold L2-normalised embeddings under the inner-product metric, so scores are cosines.
Row i of the catalogue is faiss id i: vectors are only ever appended, never removed or re-numbered.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import faiss
import numpy as np

from index.config import IndexConfig

logger = logging.getLogger(__name__)

MIN_POINTS_PER_CENTROID = 39  # faiss warns when k-means gets fewer training points per centroid
PQ_CENTROIDS = 256  # 8-bit PQ codes: every sub-quantizer is a 256-centroid k-means
MIN_IVF_LISTS = 64  # below this an inverted file prunes too little to beat scanning PQ codes


def gpu_available() -> bool:
    """faiss-gpu installed and a GPU visible; faiss-cpu has no `index_cpu_to_gpu` at all."""
    return hasattr(faiss, "index_cpu_to_gpu") and faiss.get_num_gpus() > 0


def choose_nlist(n: int, train_points: int = 0) -> int:
    """A power of two in [4, 8] * sqrt(n), halved until every list gets 39 training points."""
    assert n > 0, "an inverted file needs at least one vector"
    available = min(n, train_points) if train_points else n
    nlist = 1 << max(0, int(math.floor(math.log2(8 * math.sqrt(n)))))
    while nlist > 1 and nlist * MIN_POINTS_PER_CENTROID > available:
        nlist //= 2
    return nlist


def train_sample_size(n: int, nlist: int, config: IndexConfig) -> int:
    """How many vectors train the quantizers: 50 per inverted list, enough for the PQ codebooks too."""
    if config.train_points:
        return min(n, config.train_points)
    return min(n, max(50 * nlist, MIN_POINTS_PER_CENTROID * PQ_CENTROIDS))


def choose_factory(n: int, dim: int, config: IndexConfig) -> str:
    """The factory string for n vectors of `dim`: Flat when small, else OPQ + IVF + PQ (+ refine)."""
    m = config.pq_bytes or max(1, dim // 4)
    assert dim % m == 0, f"PQ sub-quantizers ({m}) must divide the embedding dimension ({dim})"
    sample = min(n, config.train_points) if config.train_points else n
    nlist = choose_nlist(max(n, 1), sample)
    if config.factory != "auto":
        return config.factory.format(nlist=nlist, m=m)
    if n < max(config.exact_below, PQ_CENTROIDS):
        return "Flat"
    refine = {"": "", "Flat": ",RFlat"}.get(config.refine, f",Refine({config.refine})")
    opq = f"OPQ{m}," if config.opq_iterations else ""
    if nlist < MIN_IVF_LISTS:
        # Enough points for PQ codebooks but too few to also train a useful inverted file.
        return f"{opq}PQ{m}{refine}"
    return f"{opq}IVF{nlist},PQ{m}{refine}"


def sub_indexes(index: faiss.Index) -> Iterator[faiss.Index]:
    """The index and every index nested in it (pre-transform, refine, id map), downcast."""
    index = faiss.downcast_index(index)
    yield index
    if isinstance(index, faiss.IndexPreTransform):
        yield from sub_indexes(index.index)
    elif isinstance(index, faiss.IndexRefine):
        yield from sub_indexes(index.base_index)
        yield from sub_indexes(index.refine_index)
    elif isinstance(index, faiss.IndexIDMap):
        yield from sub_indexes(index.index)


def new_index(factory: str, dim: int, config: IndexConfig) -> faiss.Index:
    """An untrained inner-product index from the factory string, tuned for a CPU build."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise ValueError(f"faiss cannot build {factory!r} for dimension {dim}: {error}") from error
    for sub in sub_indexes(index):
        if isinstance(sub, faiss.IndexIVFPQ | faiss.IndexPQ):
            sub.do_polysemous_training = False  # only polysemous search uses it, and it is slow
            sub.pq.cp.niter = config.pq_iterations
        if isinstance(sub, faiss.IndexIVF):
            sub.nprobe = min(config.nprobe, sub.nlist)
        if isinstance(sub, faiss.IndexRefine):
            sub.k_factor = float(config.refine_k_factor)
        if isinstance(sub, faiss.IndexPreTransform) and config.opq_iterations:
            for i in range(sub.chain.size()):
                transform = faiss.downcast_VectorTransform(sub.chain.at(i))
                if isinstance(transform, faiss.OPQMatrix):
                    transform.niter = transform.niter_pq_0 = config.opq_iterations
                    transform.max_train_points = 64 * PQ_CENTROIDS  # a rotation needs few points
    # index_factory already returns the concrete type; a downcast copy would not own the C++ object.
    return index


@contextlib.contextmanager
def _gpu_clustering(index: faiss.Index, use_gpu: bool) -> Iterator[None]:
    """Run the inverted file's k-means (most of the training time) on the GPU when there is one."""
    ivf = next((sub for sub in sub_indexes(index) if isinstance(sub, faiss.IndexIVF)), None)
    if not (use_gpu and ivf is not None and gpu_available()):
        yield
        return
    try:
        clustering = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(ivf.d, ivf.metric_type))
    except RuntimeError as error:
        logger.warning("faiss GPU k-means unavailable (%s); training on the CPU", error)
        yield
        return
    ivf.clustering_index = clustering
    try:
        yield
    finally:
        ivf.clustering_index = None


def train_index(index: faiss.Index, vectors: np.ndarray, config: IndexConfig) -> int:
    """Train on a seeded sample of `vectors` (n, d); returns the sample size. No-op for exact indexes."""
    if index.is_trained:
        return 0
    nlist = next((sub.nlist for sub in sub_indexes(index) if isinstance(sub, faiss.IndexIVF)), 1)
    size = train_sample_size(len(vectors), nlist, config)
    assert size >= nlist, f"{size} training vectors cannot train {nlist} inverted lists"
    rng = np.random.default_rng(config.seed)
    sample = (
        vectors if size == len(vectors) else vectors[np.sort(rng.choice(len(vectors), size, replace=False))]
    )
    with _gpu_clustering(index, config.use_gpu):
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return size


def add_vectors(index: faiss.Index, vectors: np.ndarray, use_gpu: bool = True) -> faiss.Index:
    """Append `vectors` (their faiss ids continue from ntotal); returns a CPU index, the GPU's copy if used."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if use_gpu and gpu_available():
        try:
            options = faiss.GpuMultipleClonerOptions()
            options.useFloat16 = True  # IVF-PQ lookup tables of 64 sub-quantizers overflow shared memory
            gpu_index = faiss.index_cpu_to_all_gpus(index, options)
            gpu_index.add(vectors)
            return faiss.index_gpu_to_cpu(gpu_index)
        except (RuntimeError, AttributeError) as error:  # types the GPU lacks (e.g. Refine), memory
            logger.warning("faiss GPU add failed for %s (%s); adding on the CPU", type(index).__name__, error)
    index.add(vectors)
    return index


def build_index(vectors: np.ndarray, config: IndexConfig) -> tuple[faiss.Index, str, int]:
    """Choose, train and fill an index over normalised (n, d) vectors: (CPU index, factory, trained on)."""
    assert vectors.ndim == 2 and len(vectors) > 0, "build_index needs a non-empty (n, d) array"
    factory = choose_factory(len(vectors), vectors.shape[1], config)
    index = new_index(factory, vectors.shape[1], config)
    trained_on = train_index(index, vectors, config)
    index = add_vectors(index, vectors, config.use_gpu)
    logger.info("built %s over %d vectors (trained on %d)", factory, index.ntotal, trained_on)
    return index, factory, trained_on
