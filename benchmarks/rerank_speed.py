"""Re-rank speed: one query's cross-encoder pass over `--pairs` candidates, beside this machine's
matrix-multiply ceiling measured in the same run (in bf16 where native, else fp32: `model/precision.py`).

    python benchmarks/rerank_speed.py --model runs/hm/best --pairs 50 --repeats 7

Three shapes of query: a short text query (a shopper's name, colour and type: ~12 word pieces) and a
whole-description text query, each against `--pairs` candidate images (16 pooled patches), and an image
query against `--pairs` description-length candidate texts, each pass as the service runs it: the
query's side once, the candidates' from the states a bundle stores below the model's fusion layer (without
one, from their tokens and patches), then the joint layers. For each: the median ms per query, the
FLOPs it takes, the share of the ceiling reached, and the floor (ms at 100% of the ceiling). Three ways
of running on CPU: bf16 autocast over fp32 weights, weights held in bf16 (`bf16_weights`), and the
encoder layers in int8 (`int8_matching`), taking turns within each repeat so machine noise hits all alike.
On a CPU without native bf16 the first two both run fp32.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import numpy as np
from serve_load import ceiling_dtype, flops_per_pair, matmul_tflops  # also puts the repo on sys.path

from model.inference import FashionBertInference
from model.pair_states import PairStates

SHORT = "Satin midi skirt. Black Skirt."
FULL = (
    "Satin midi skirt. Black Skirt. Calf-length skirt in satin with a high waist, concealed zip at the "
    "back and a slit at the hem. Lined."
)


@dataclass
class Candidates:
    """A query's candidates as the service's bundle has them: texts and pooled patches, and for a model with
    a fusion layer each side's states below it (the bundle stores those; the service reads only them)."""

    token_ids: list[list[int]]
    patches: np.ndarray  # (n, N, D)
    text_states: tuple[np.ndarray, np.ndarray] | None = None
    image_states: np.ndarray | None = None


def rerank(
    inference: FashionBertInference, query: list[int] | np.ndarray, candidates: Candidates
) -> np.ndarray:
    """One query's re-rank pass as the service runs it: the query's side once, the candidates' from the
    bundle's states (or, without a fusion layer, from their tokens and patches), then the joint layers."""
    n = len(candidates.patches)

    def broadcast(array: np.ndarray) -> np.ndarray:
        return np.broadcast_to(array, (n, *array.shape[1:]))

    if isinstance(query, list):  # a text query: (query text, candidate image)
        text, mask = map(broadcast, inference.text_states([query]))
        image = candidates.image_states
        image = inference.image_states(candidates.patches) if image is None else image
    else:  # an image query: (candidate text, query image)
        image = broadcast(inference.image_states(query[None]))
        text, mask = candidates.text_states or inference.text_states(candidates.token_ids)
    return inference.score_states(PairStates(text, mask, image, np.zeros(n, np.float32)))


def time_query(
    inference: FashionBertInference, query: list[int] | np.ndarray, candidates: Candidates
) -> float:
    start = time.perf_counter()
    rerank(inference, query, candidates)
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
    # Candidate texts of an image query: distinct descriptions.
    texts = reference.tokenize([f"{FULL} Style number {i}." for i in range(args.pairs)])
    candidates = Candidates(texts, patches)
    if config.fusion_layer:  # what the index build stores, computed as it does (bf16 autocast)
        candidates.text_states = reference.text_states(texts)
        candidates.image_states = reference.image_states(patches)
    shapes = {
        f"text query, short ({len(short)} tokens)": (short, float(len(short))),
        f"text query, description ({len(full)} tokens)": (full, float(len(full))),
        "image query, description candidates": (patches[0], float(np.mean([len(t) for t in texts]))),
    }

    ceiling = matmul_tflops()
    print(
        f"{ceiling_dtype()} matmul ceiling {ceiling:.3f} TFLOP/s; {args.pairs} pairs per query; "
        f"median of {args.repeats}"
    )
    print(f"{'query':<40} {'variant':<13} {'ms':>7} {'GFLOP':>6} {'share':>6} {'floor ms':>8}")
    for name, (query, tokens) in shapes.items():
        for inference in variants.values():
            time_query(inference, query, candidates)  # warm-up: the allocator
        times: dict[str, list[float]] = {variant: [] for variant in variants}
        for _ in range(args.repeats):
            for variant, inference in variants.items():
                times[variant].append(time_query(inference, query, candidates))
        gflop = args.pairs * flops_per_pair(args.model, tokens) / 1e9
        for variant, samples in times.items():
            ms = statistics.median(samples)
            share = gflop / ms / ceiling  # GFLOP/ms = TFLOP/s
            print(f"{name:<40} {variant:<13} {ms:7.1f} {gflop:6.1f} {share:6.0%} {gflop / ceiling:8.1f}")
    a = rerank(variants["autocast"], short, candidates)
    for variant in ("bf16 weights", "int8 matching"):
        b = rerank(variants[variant], short, candidates)
        order_a, order_b = np.argsort(-a)[:10], np.argsort(-b)[:10]
        print(
            f"scores: max |autocast - {variant}| {np.abs(a - b).max():.3f}; top-10 overlap "
            f"{len(set(order_a) & set(order_b))}/10"
        )


if __name__ == "__main__":
    main()
