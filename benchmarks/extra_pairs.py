"""Do another catalogue's pairs help the image-tower fit? H&M's train split alone, or with Myntra's beside it.

    python benchmarks/extra_pairs.py --model runs/hm-listwise3-recipe/best --data hm:../shared/data/hm \
        --extra myntra:../shared/data/myntra

The image towers overfit H&M's 8,908 train pairs (among 1,059 of them they put the partner first 93-95% of the
time, among as many unseen items 54-56%): more pairs are the textbook cure, and Myntra has 39,639 (a six-word
title and a 60x80 thumbnail each). Fits the checkpoint's image towers as `fashionbert fit-image-tower` does
(the locked text tower, 8 towers, the train photos and their views), once on H&M's train split alone and once
with `--extra`'s items added (the locked text tower embeds their titles; their photo stands in for each of its
views, which are not cached), and measures both on H&M's validation split with `tower_negatives.py`'s draws:
gallery R@1/R@10 and the sampled protocol ranked by the towers' cosine. The extra catalogue's features are
read from the cache in slices and pooled at once (the towers read the mean of the grid), so memory stays at
one slice's grids.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from tower_negatives import FitSplits, add_fit_arguments, pooled

from app.cli import DEFAULT_CACHE
from model.catalogue import Catalogue, load_catalogue
from model.data import catalogue_features
from model.evaluation import text_codes
from model.patch_features import PatchFeatureConfig
from model.tower_fit import TowerFitConfig

_SLICE = 4096  # extra items whose patch grids are in memory at once


def pooled_catalogue(catalogue: Catalogue, patch_config: PatchFeatureConfig) -> tuple[Catalogue, np.ndarray]:
    """The items with a readable photo and their (n, 1, D) pooled features, a slice at a time."""
    kept, parts = [], []
    for start in range(0, len(catalogue), _SLICE):
        part = Catalogue(catalogue.name, catalogue.source, catalogue.items[start : start + _SLICE])
        seen, grids = catalogue_features(part, DEFAULT_CACHE, patch_config)
        kept += seen.items
        parts.append(pooled(grids))
    return Catalogue(catalogue.name, catalogue.source, kept), np.concatenate(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_fit_arguments(parser)
    parser.add_argument("--extra", required=True, help="catalogue SPEC whose pairs join the fit")
    parser.add_argument("--extra-items", type=int, default=None, help="read only its first N items")
    parser.add_argument("--steps", default="600", help="fit steps, comma-separated (600: the default fit)")
    args = parser.parse_args()

    splits = FitSplits.load(args)
    inference = splits.inference
    patch_config = PatchFeatureConfig.from_dict(inference.config.patch_features)
    extra, extra_features = pooled_catalogue(load_catalogue(args.extra, limit=args.extra_items), patch_config)
    train_texts = inference.encode_texts([item.text for item in splits.train.items])
    extra_texts = inference.encode_texts([item.text for item in extra.items])
    val_texts = inference.encode_texts([item.text for item in splits.val.items])
    train_codes = text_codes(splits.train)
    # Codes of the joint set: an extra text identical to a train text is the same code.
    joint_codes = text_codes(Catalogue("joint", "", [*splits.train.items, *extra.items]))
    photos, views = splits.train_features, splits.views
    settings = {
        "train split alone": (train_texts, photos, views, train_codes),
        f"with {len(extra)} {extra.name} pairs": (
            np.concatenate([train_texts, extra_texts]),
            np.concatenate([photos, extra_features]),
            [np.concatenate([grids, extra_features]) for grids in views],
            joint_codes,
        ),
    }
    print(
        f"{len(splits.train)} train items, {len(args.views)} views, {args.towers} towers from seed {args.seed}"
    )
    for steps in (int(s) for s in args.steps.split(",")):
        config = TowerFitConfig(towers=args.towers, seed=args.seed, steps=steps)
        for label, (texts, features, fit_views, codes) in settings.items():
            started = time.perf_counter()
            images = splits.refit(texts, config, features, fit_views, codes)
            seconds = time.perf_counter() - started
            print(
                f"{steps} steps, {label} ({seconds:.0f} s fit): {splits.measure(images, val_texts)}",
                flush=True,
            )


if __name__ == "__main__":
    main()
