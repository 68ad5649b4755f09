"""Re-rank speed: one query's cross-encoder pass over `--pairs` candidates, beside this machine's bf16
matrix-multiply ceiling measured in the same run.

    python benchmarks/rerank_speed.py --model runs/hm/best --pairs 50 --repeats 7

Three shapes of query: a short text query (a shopper's name, colour and type: ~12 word pieces) and a
whole-description text query, each against `--pairs` candidate images (16 pooled patches), and an image
query against `--pairs` description-length candidate texts. For each: the median ms per query, the
FLOPs it takes, the share of the ceiling reached, and the floor (ms at 100% of the ceiling). Three ways
of running on CPU: bf16 autocast over fp32 weights, weights held in bf16 (`bf16_weights`), and the
encoder layers in int8 (`int8_matching`), taking turns within each repeat so machine noise hits all alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from serve_load import bf16_matmul_tflops, flops_per_pair  # also puts the repo on sys.path

from model.inference import FashionBertInference

SHORT = "Satin midi skirt. Black Skirt."
FULL = (
    "Satin midi skirt. Black Skirt. Calf-length skirt in satin with a high waist, concealed zip at the "
    "back and a slit at the hem. Lined."
)


def time_query(inference: FashionBertInference, token_ids: list[list[int]], patches: np.ndarray) -> float:
    start = time.perf_counter()
    inference.match(token_ids, patches)
    return 1000 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--pairs", type=int, default=50, help="candidates per query (the service's rerank_k)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    variants = {
        "autocast": FashionBertInference.from_checkpoint(args.model, device="cpu"),
        "bf16 weights": FashionBertInference.from_checkpoint(args.model, device="cpu", bf16_weights=True),
        "int8 matching": FashionBertInference.from_checkpoint(
            args.model, device="cpu", bf16_weights=True, int8_matching=True
        ),
    }
    reference = variants["autocast"]
    config = reference.config
    rng = np.random.default_rng(0)
    patches = rng.standard_normal((args.pairs, config.encoder_patches, config.patch_feature_dim))
    patches = patches.astype(np.float32)
    short, full = reference.tokenize([SHORT, FULL])
    # Candidate texts of an image query: distinct descriptions (the service caches their text-tower
    # embeddings, so after the warm-up only the joint pass runs, as in serving).
    texts = reference.tokenize([f"{FULL} Style number {i}." for i in range(args.pairs)])
    shapes = {
        f"text query, short ({len(short)} tokens)": ([short] * args.pairs, float(len(short))),
        f"text query, description ({len(full)} tokens)": ([full] * args.pairs, float(len(full))),
        "image query, description candidates": (texts, float(np.mean([len(t) for t in texts]))),
    }

    ceiling = bf16_matmul_tflops()
    print(
        f"bf16 matmul ceiling {ceiling:.3f} TFLOP/s; {args.pairs} pairs per query; median of {args.repeats}"
    )
    print(f"{'query':<40} {'variant':<13} {'ms':>7} {'GFLOP':>6} {'share':>6} {'floor ms':>8}")
    for name, (token_ids, tokens) in shapes.items():
        for inference in variants.values():
            time_query(inference, token_ids, patches)  # warm-up: allocator, text cache
        times: dict[str, list[float]] = {variant: [] for variant in variants}
        for _ in range(args.repeats):
            for variant, inference in variants.items():
                times[variant].append(time_query(inference, token_ids, patches))
        gflop = args.pairs * flops_per_pair(args.model, tokens) / 1e9
        for variant, samples in times.items():
            ms = statistics.median(samples)
            share = gflop / ms / ceiling  # GFLOP/ms = TFLOP/s
            print(f"{name:<40} {variant:<13} {ms:7.1f} {gflop:6.1f} {share:6.0%} {gflop / ceiling:8.1f}")
    first = shapes[next(iter(shapes))][0]
    a = variants["autocast"].match(first, patches)
    for variant in ("bf16 weights", "int8 matching"):
        b = variants[variant].match(first, patches)
        order_a, order_b = np.argsort(-a)[:10], np.argsort(-b)[:10]
        print(
            f"scores: max |autocast - {variant}| {np.abs(a - b).max():.3f}; top-10 overlap "
            f"{len(set(order_a) & set(order_b))}/10"
        )


if __name__ == "__main__":
    main()
