"""How much the cross-encoder adds to the towers: gallery retrieval with the re-rank score split in two.

    python benchmarks/rerank_fusion.py --model runs/hm-listwise/best --data hm:../shared/data/hm
    python benchmarks/rerank_fusion.py ... --split train    # the items the model was trained on

The alignment logit is `head(joint pass) + tower_scale * cosine` (model/fashionbert.py). This scores the
validation gallery's recalled candidates once with the head alone, then ranks them by
`head + w * cosine` for a range of w: w = the model's own tower_scale is what the service serves (and
`fashionbert eval` reports), w = 0 the cross-encoder's head alone, and the embeddings-only row the
cosine alone. A w better than the served one is picked on one half of the queries and reported on the
other (both ways), so the figure is not tuned on the queries it is measured on.
"""

from __future__ import annotations

import argparse

import numpy as np
import serve_load  # noqa: F401 - puts the repo on sys.path

from app.cli import DEFAULT_CACHE
from model.catalogue import Catalogue, load_catalogue
from model.data import catalogue_features, split_with_features
from model.evaluation import (
    DIRECTIONS,
    _embedding_search,
    _match_pairs,
    draw_queries,
    reranked_ranks,
    text_codes,
)
from model.inference import FashionBertInference
from model.metrics import recall_at_k
from model.patch_features import PatchFeatureConfig


def load_split(
    spec: str,
    inference: FashionBertInference,
    part: str,
    limit: int | None = None,
    patch_config: PatchFeatureConfig | None = None,
) -> tuple[Catalogue, np.ndarray]:
    """The validation split `fashionbert eval` measures on (its default fraction and seed), or the train
    split the model was fitted on (does the head rank what it was trained on?); with the model's patch
    features unless `patch_config` names others."""
    patch_config = patch_config or PatchFeatureConfig.from_dict(inference.config.patch_features)
    kept, features = catalogue_features(load_catalogue(spec, limit=limit), DEFAULT_CACHE, patch_config)
    train, validation = split_with_features(kept, features, 0.1, seed=0)
    return train if part == "train" else validation


def fused_ranks(
    head: np.ndarray,
    cosine: np.ndarray,
    correct: np.ndarray,
    embedding_ranks: np.ndarray,
    weight: float,
    rows: np.ndarray,
) -> np.ndarray:
    """Ranks of the queries in `rows` with their (Q, K) recalled candidates ordered by head + weight x cosine."""
    return reranked_ranks(head[rows] + weight * cosine[rows], correct[rows], embedding_ranks[rows])


def show(direction: str, label: str, ranks: np.ndarray) -> None:
    recalls = recall_at_k(ranks, (1, 5, 10))
    print(f"{direction:<5} {label:<40} " + " ".join(f"{recalls[f'R@{k}']:6.1f}" for k in (1, 5, 10)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--data", required=True, help="catalogue SPEC (its validation split is the gallery)")
    parser.add_argument(
        "--split", choices=("validation", "train"), default="validation", help="the gallery and its queries"
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="read only the first N items (as train --limit)"
    )
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--recall-k", type=int, default=50, help="candidates re-ranked per query")
    parser.add_argument("--weights", default="0,2.5,5,10,15,20,30,50", help="tower weights w to try")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    inference = FashionBertInference.from_checkpoint(args.model, device="cpu")
    catalogue, patches = load_split(args.data, inference, args.split, args.limit)
    n = len(catalogue)
    queries = draw_queries(n, args.queries, np.random.default_rng(0))  # fashionbert eval's queries
    codes = text_codes(catalogue)
    token_ids = inference.tokenize([item.text for item in catalogue.items])
    texts = inference.encode_token_ids(token_ids)
    images = inference.encode_images(patches)
    served = round(float(inference.model.tower_scale.detach()), 2)
    weights = sorted({float(w) for w in args.weights.split(",")} | {served})
    every = np.arange(len(queries))
    halves = every[0::2], every[1::2]

    print(f"{n} items, {len(queries)} queries, recall {args.recall_k}; served tower weight {served:.2f}")
    print(f"{'dir':<5} {'ranking':<40} {'R@1':>6} {'R@5':>6} {'R@10':>6}")
    for direction in DIRECTIONS:
        query_side, gallery_side = (images, texts) if direction == "i2t" else (texts, images)
        embedding_ranks, top, _ = _embedding_search(
            query_side[queries], gallery_side, codes[queries], codes, args.recall_k
        )
        repeated = np.repeat(queries, top.shape[1])
        text_index, image_index = (top.ravel(), repeated) if direction == "i2t" else (repeated, top.ravel())
        head = _match_pairs(  # the cross-encoder's head alone: the tower term zeroed
            inference,
            token_ids,
            patches,
            text_index,
            image_index,
            args.batch_size,
            tower_similarity=np.zeros(len(text_index), np.float32),
        ).reshape(top.shape)
        parts = (
            head,
            (texts[text_index] * images[image_index]).sum(-1).reshape(top.shape),
            codes[top] == codes[queries][:, None],  # (Q, K) which candidates count as correct
            embedding_ranks,
        )
        show(direction, "embeddings only", embedding_ranks)
        for weight in weights:
            label = f"head + {weight:g} x cosine" + (" (served)" if weight == served else "")
            show(direction, label, fused_ranks(*parts, weight, every))
        # Pick w on one half of the queries, measure on the other; both ways, then together.
        picked, crossed = [], np.empty(len(queries), np.int64)
        for tune, test in (halves, halves[::-1]):
            best = max(weights, key=lambda w: float((fused_ranks(*parts, w, tune) == 1).mean()))
            picked.append(best)
            crossed[test] = fused_ranks(*parts, best, test)
        show(direction, f"w picked on the other half ({', '.join(f'{w:g}' for w in picked)})", crossed)


if __name__ == "__main__":
    main()
