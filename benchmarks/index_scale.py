"""How the recall index grows: memory, build time and query latency at 1M synthetic items, projected beyond.

    python benchmarks/index_scale.py --n 1000000 --train-points 100000

One recall index (a bundle has two: image and text) over synthetic clustered vectors of the model's
dimension, built exactly as `index build` would (`IndexConfig` defaults, training sub-sampled).
The projection scales the measured per-item bytes and per-code scan cost to larger catalogues.
"""

from __future__ import annotations

import argparse
import logging
import resource
import time

import faiss
import numpy as np
from index_common import machine, print_table  # also puts the repo on sys.path

from index.config import IndexConfig
from index.factory import add_vectors, choose_factory, choose_nlist, new_index, train_index
from index.search import filtered_search

PATCH_CODE_BYTES = 64 * 64  # PQ64 per patch, 64 patches: on disk, memory-mapped, read for the shortlist only
METADATA_BYTES = 1_100  # measured by index_size.py on H&M (SQLite with its indexes)


def clustered(n: int, dim: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """Products around 1,000 sub-category centres, colour variants around products; streamed in chunks."""
    rng = np.random.default_rng(seed)
    unit = 1 / np.sqrt(dim)
    centres = np.random.default_rng(99).standard_normal((1_000, dim)).astype(np.float32) * unit
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centres[rng.integers(0, 1_000, m)] + 0.8 * unit * rng.standard_normal((m, dim), dtype=np.float32)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def latency(index: faiss.Index, queries: np.ndarray, k: int, nprobe: int) -> tuple[float, float, float]:
    """(p50 ms, p99 ms) one query at a time, as the service asks, and ms/query in one batch."""
    single = []
    for query in queries:
        started = time.perf_counter()
        filtered_search(index, query[None], k, nprobe=nprobe)
        single.append(1000 * (time.perf_counter() - started))
    started = time.perf_counter()
    filtered_search(index, queries, k, nprobe=nprobe)
    batched = 1000 * (time.perf_counter() - started) / len(queries)
    return float(np.percentile(single, 50)), float(np.percentile(single, 99)), batched


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument(
        "--train-points", type=int, default=100_000, help="sub-sample that trains the quantizers"
    )
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=100, help="recall_k: candidates per query")
    parser.add_argument("--nprobe", default="32,64,128")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    config = IndexConfig(train_points=args.train_points)
    started = time.perf_counter()
    vectors = clustered(args.n, args.dim, seed=0)
    queries = clustered(args.queries, args.dim, seed=1)
    generate_s = time.perf_counter() - started

    factory = choose_factory(args.n, args.dim, config)
    index = new_index(factory, args.dim, config)
    started = time.perf_counter()
    trained_on = train_index(index, vectors, config)
    train_s = time.perf_counter() - started
    started = time.perf_counter()
    for start in range(0, args.n, 200_000):
        index = add_vectors(index, vectors[start : start + 200_000], config.use_gpu)
    add_s = time.perf_counter() - started
    index_bytes = faiss.serialize_index(index).nbytes
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    exact = faiss.IndexFlatIP(args.dim)
    exact.add(vectors)
    started = time.perf_counter()
    _, truth = exact.search(queries, args.k)
    exact_ms = 1000 * (time.perf_counter() - started) / len(queries)
    del exact

    rows = []
    for nprobe in map(int, args.nprobe.split(",")):
        _, found = filtered_search(index, queries, args.k, nprobe=nprobe)
        recall = np.mean([len(set(f) & set(t)) / args.k for f, t in zip(found, truth, strict=True)])
        p50, p99, batched = latency(index, queries, args.k, nprobe)
        rows.append(
            {
                "nprobe": nprobe,
                f"recall@{args.k}": float(recall),
                "p50 ms": p50,
                "p99 ms": p99,
                "batched ms/q": batched,
            }
        )

    print(f"machine: {machine()}; faiss threads {faiss.omp_get_max_threads()}")
    print(
        f"{args.n:,} x {args.dim} vectors ({generate_s:.0f} s to generate); factory {factory}, trained on "
        f"{trained_on:,} points in {train_s:.0f} s, added in {add_s:.0f} s ({args.n / add_s:,.0f} vectors/s)"
    )
    print(
        f"one index: {index_bytes / 1e6:,.0f} MB = {index_bytes / args.n:.0f} bytes/item; process peak RSS "
        f"{peak_rss / 1e9:.1f} GB (vectors in float32 included); exact search {exact_ms:.1f} ms/query"
    )
    print_table(rows, f"query latency and recall at {args.n:,} items (k = {args.k}, one index)")

    per_item = index_bytes / args.n
    default_nprobe = config.nprobe
    measured = next((row for row in rows if row["nprobe"] == default_nprobe), rows[-1])
    measured_nlist = choose_nlist(args.n, args.train_points)
    projection = []
    for n in (1_000_000, 10_000_000, 50_000_000, 100_000_000):
        nlist = choose_nlist(n)  # with enough training points (39 per list)
        # Scan cost grows with the codes visited: nprobe * n / nlist; refine adds a constant k * k_factor.
        scale = (n / nlist) / (args.n / measured_nlist)
        projection.append(
            {
                "items": n,
                "nlist": nlist,
                "2 indexes RAM GB": 2 * per_item * n / 1e9,
                "patch codes disk GB": PATCH_CODE_BYTES * n / 1e9,
                "metadata disk GB": METADATA_BYTES * n / 1e9,
                "p50 ms (est.)": measured["p50 ms"] * max(scale, 1.0) if n > args.n else measured["p50 ms"],
                "coarse M MACs/q": nlist * args.dim / 1e6,
                "train points": 39 * nlist,
            }
        )
    print_table(
        projection, f"projection at nprobe {measured['nprobe']} (latency scaled by codes scanned per list)"
    )
    print(
        "The estimate counts the lists' codes only. Past ~16k lists the flat coarse quantizer "
        "(nlist x dim multiply-adds per query) costs a millisecond of its own: switch to an HNSW "
        "coarse quantizer (factory IVF{nlist}_HNSW32,...) and train on a GPU."
    )


if __name__ == "__main__":
    main()
