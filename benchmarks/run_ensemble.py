"""Do whole training runs make different mistakes? Their towers alone, and all of them as one ensemble.

    python benchmarks/run_ensemble.py --data hm:../shared/data/hm \
        --models runs/hm-listwise3-recipe/best,runs/hm-text1200-recipe/best,runs/hm-text800-recipe/best

An ensemble of 8 image towers fitted to one text tower gains about 3 points over one tower
(benchmarks/RESULTS.md, "Image tower ensemble"). Runs of the whole recipe differ more than that (their own
pre-training, listwise phase and text tower), so if their errors were independent, averaging them would
gain more. Measures each checkpoint's towers on the validation split with `tower_negatives.py`'s draws
(gallery R@1/R@10, the sampled protocol by the towers' cosine), then the ensemble that sums their cosines:
each side's embeddings concatenated and L2-normalised, what one index of the concatenated vectors would
serve. The checkpoints must read the same patch features.
"""

from __future__ import annotations

import argparse

import numpy as np
from rerank_fusion import load_split
from tower_negatives import TowerMeasure

from model.inference import FashionBertInference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, help="checkpoint folders, comma-separated")
    parser.add_argument("--data", required=True, help="catalogue SPEC (its validation split is measured)")
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args()

    texts, images, measure, ids = [], [], None, None
    for path in args.models.split(","):
        inference = FashionBertInference.from_checkpoint(path, device="cpu")
        val, val_features = load_split(args.data, inference, "validation")
        split_ids = [item.id for item in val.items]
        if ids is not None and split_ids != ids:
            raise SystemExit(f"{path} reads another validation split (other patch features?) than the first")
        ids = split_ids
        measure = measure or TowerMeasure(val, args.queries)
        texts.append(inference.encode_texts([item.text for item in val.items]))
        images.append(inference.encode_images(val_features))
        print(f"{path}: {measure(images[-1], texts[-1])}", flush=True)
    assert measure is not None

    def joined(parts: list[np.ndarray]) -> np.ndarray:
        both = np.concatenate(parts, axis=1)
        return both / np.linalg.norm(both, axis=1, keepdims=True)

    print(f"ensemble of {len(texts)}: {measure(joined(images), joined(texts))}")
    # How alike are the runs' mistakes? Sampled queries whose partner is not first, per run.
    for direction, asked, searched in (("i2t", images, texts), ("t2i", texts, images)):
        missed = np.stack(
            [measure.sampled_ranks(a, s) > 1 for a, s in zip(asked, searched, strict=True)]
        )  # (runs, Q)
        print(
            f"{direction} sampled misses: {missed.sum(1).tolist()} per run, {int(missed.all(0).sum())} missed "
            f"by every run, {int(missed.any(0).sum())} by any"
        )


if __name__ == "__main__":
    main()
