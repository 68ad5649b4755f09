"""Which false texts should the image-tower fit rank each image against: the batch's, or every train text?

    python benchmarks/tower_negatives.py --model runs/hm-views/listwise/best --data hm:../shared/data/hm
    python benchmarks/tower_negatives.py ... --seed 100 --views ''   # other seeds; the photos alone
    python benchmarks/tower_negatives.py ... --settings 'weight_decay=0.5;steps=300'   # any other fit setting

Fits the checkpoint's image towers once per setting with `fashionbert fit-image-tower`'s code
(`fit_image_tower`: 8 towers on the train photos and their views, against the locked text tower), by
default once per `TowerFitConfig.text_negatives`, and measures each on the validation split with the
1,000 queries of `fashionbert eval`: full-gallery R@1 / R@10 with the embeddings, and the paper's sampled
protocol (each query's partner among 100 negatives of its sub-category, the same draw as the eval's) ranked
by the towers' cosine alone, the term that decides the served logit (benchmarks/RESULTS.md, "Why re-ranking
adds nothing yet"). The cross-encoder is not run, so each setting takes the fit's minutes, not an evaluation's.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass, fields, replace

import numpy as np
from rerank_fusion import load_split

from app.cli import DEFAULT_CACHE, _views
from model.catalogue import Catalogue
from model.data import catalogue_features
from model.evaluation import EvalConfig, _embedding_search, draw_queries, sampled_candidates, text_codes
from model.inference import FashionBertInference
from model.metrics import rank_of_positive, recall_at_k
from model.patch_features import PatchFeatureConfig
from model.tower_fit import TowerFitConfig, fit_image_tower


class TowerMeasure:
    """`fashionbert eval`'s draws on a split: its gallery queries, and its sampled queries with their 100
    negatives each; called with the split's image and text embeddings, the towers' figures as one line."""

    def __init__(self, split: Catalogue, queries: int) -> None:
        config = EvalConfig(num_queries=queries)
        self.codes = text_codes(split)
        self.gallery_queries = draw_queries(len(split), queries, np.random.default_rng(config.seed))
        self.sampled_queries, negatives = sampled_candidates(split, config)
        self.candidates = np.concatenate([self.sampled_queries[:, None], negatives], axis=1)  # partner first
        self.correct = self.codes[self.candidates] == self.codes[self.sampled_queries][:, None]

    def __call__(self, images: np.ndarray, texts: np.ndarray) -> str:
        codes, cells = self.codes, []
        for direction, (asked, searched) in (("i2t", (images, texts)), ("t2i", (texts, images))):
            queries = self.gallery_queries
            ranks, *_ = _embedding_search(asked[queries], searched, codes[queries], codes, 10)
            gallery = recall_at_k(ranks, (1, 10))
            sampled = recall_at_k(self.sampled_ranks(asked, searched), (1,))["R@1"]
            cells.append(
                f"{direction} gallery R@1 {gallery['R@1']:.1f} R@10 {gallery['R@10']:.1f}, sampled R@1 {sampled:.1f}"
            )
        return "; ".join(cells)

    def sampled_cosine(self, asked: np.ndarray, searched: np.ndarray) -> np.ndarray:
        """(Q, 101) the towers' cosine of each sampled query with its candidates, partner first: `asked`
        holds the split's query-side embeddings, `searched` the candidate side's."""
        return np.einsum("qe,qke->qk", asked[self.sampled_queries], searched[self.candidates])

    def sampled_ranks(self, asked: np.ndarray, searched: np.ndarray) -> np.ndarray:
        """(Q,) rank of each sampled query's partner among its candidates by the towers' cosine."""
        return rank_of_positive(self.sampled_cosine(asked, searched), self.correct)


def add_fit_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every image-tower fit benchmark takes: the checkpoint and data, the fit's views, towers
    and seed, and the queries measured."""
    parser.add_argument("--model", required=True, help="checkpoint folder (its text tower is kept)")
    parser.add_argument(
        "--data", required=True, help="catalogue SPEC (train split fits, validation measures)"
    )
    parser.add_argument("--views", type=_views, default=("flip", "crop", "flipcrop"))
    parser.add_argument("--towers", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="the first tower's; tower k's is seed + k")
    parser.add_argument("--queries", type=int, default=1000)


def pooled(grids: np.ndarray) -> np.ndarray:
    """(n, 1, D) float32: the grid's mean, the one vector an image tower reads, shaped as a grid of one."""
    return grids.mean(1, dtype=np.float32, keepdims=True)


@dataclass
class FitSplits:
    """A checkpoint and its dev split as an image-tower fit reads them: the train photos' features and
    their views' (what the fit learns from), the validation photos' and eval's draws (what is measured).
    The train side is held `pooled`: the towers read no more, and the four looks' full grids would hold
    about 7 GB."""

    inference: FashionBertInference
    train: Catalogue
    train_features: np.ndarray
    views: list[np.ndarray]
    val: Catalogue
    val_features: np.ndarray
    measure: TowerMeasure

    @classmethod
    def load(cls, args: argparse.Namespace) -> FitSplits:
        """From `add_fit_arguments`' flags."""
        inference = FashionBertInference.from_checkpoint(args.model, device="cpu")
        patch_config = PatchFeatureConfig.from_dict(inference.config.patch_features)
        (train, train_features), (val, val_features) = (
            load_split(args.data, inference, part) for part in ("train", "validation")
        )
        views = [
            pooled(catalogue_features(train, DEFAULT_CACHE, patch_config, view=view)[1])
            for view in args.views
        ]
        return cls(
            inference,
            train,
            pooled(train_features),
            views,
            val,
            val_features,
            TowerMeasure(val, args.queries),
        )

    def refit(
        self,
        train_texts: np.ndarray,
        config: TowerFitConfig,
        features: np.ndarray | None = None,
        views: list[np.ndarray] | None = None,
        codes: np.ndarray | None = None,
    ) -> np.ndarray:
        """Fit a copy of the checkpoint's image towers to `train_texts` as `fashionbert fit-image-tower`
        does (the photos and their views); the validation photos' embeddings under the new towers.
        `features`, `views` and `codes` stand in for the train split's, to fit on other pairs."""
        model = copy.deepcopy(self.inference.model)
        features = self.train_features if features is None else features
        views = self.views if views is None else views
        codes = text_codes(self.train) if codes is None else codes
        fit_image_tower(model, train_texts, features, codes, config, log_every=0, views=views)
        return FashionBertInference(model, self.inference.tokenizer, device="cpu").encode_images(
            self.val_features
        )


def _typed(kind: type, value: str) -> object:
    if kind is bool:  # bool("False") is True
        if value.lower() not in ("true", "false"):
            raise argparse.ArgumentTypeError(f"{value!r}: expected true or false")
        return value.lower() == "true"
    return kind(value)


def fit_settings(text: str) -> list[dict[str, object]]:
    """'steps=300,weight_decay=0.5;text_negatives=batch' -> one dict of `TowerFitConfig` fields per
    setting, each value read as its field's type."""
    types = {field.name: type(getattr(TowerFitConfig(), field.name)) for field in fields(TowerFitConfig)}
    settings = []
    for setting in text.split(";"):
        pairs = [pair.split("=", 1) for pair in setting.split(",") if pair.strip()]
        unknown = [name for name, *_ in pairs if name.strip() not in types]
        if unknown or any(len(pair) != 2 for pair in pairs):
            raise argparse.ArgumentTypeError(f"{setting!r}: expected field=value pairs of {sorted(types)}")
        settings.append({name.strip(): _typed(types[name.strip()], value.strip()) for name, value in pairs})
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_fit_arguments(parser)
    parser.add_argument(
        "--settings",
        type=fit_settings,
        default="text_negatives=batch;text_negatives=split",
        help="TowerFitConfig fields, field=value joined by ',' within a setting and ';' between settings",
    )
    args = parser.parse_args()

    splits = FitSplits.load(args)
    inference, train = splits.inference, splits.train
    train_texts = inference.encode_texts([item.text for item in train.items])
    val_texts = inference.encode_texts([item.text for item in splits.val.items])

    print(f"{len(train)} train items, {len(args.views)} views, {args.towers} towers from seed {args.seed}")
    for setting in args.settings:
        config = replace(TowerFitConfig(towers=args.towers, seed=args.seed), **setting)
        started = time.perf_counter()
        images = splits.refit(train_texts, config)
        seconds = time.perf_counter() - started
        label = ", ".join(f"{name}={value}" for name, value in setting.items())
        print(f"{label} ({seconds:.0f} s fit): {splits.measure(images, val_texts)}", flush=True)


if __name__ == "__main__":
    main()
