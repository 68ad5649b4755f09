"""Training data in memory: a catalogue split with its token ids and cached patch features."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from model.catalogue import Catalogue
from model.feature_cache import FeatureCache
from model.inference import pick_device
from model.patch_features import PatchFeatureConfig, PatchFeatureExtractor


@dataclass
class TrainingData:
    """A split held in memory: token ids, cached patch features and the hard-negative groups."""

    catalogue: Catalogue
    token_ids: list[list[int]]
    patch_features: np.ndarray  # (n, N, D) float16
    subcategories: list[str] = field(init=False)
    categories: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.subcategories = [item.subcategory for item in self.catalogue.items]
        self.categories = [item.category for item in self.catalogue.items]
        self.texts = [item.text for item in self.catalogue.items]

    def __len__(self) -> int:
        return len(self.token_ids)


def grouped_batches(
    data: TrainingData, batch_size: int, group_size: int, rng: random.Random
) -> Iterator[list[int]]:
    """One epoch of batches built from shuffled same-sub-category groups, so in-batch hard negatives exist."""
    by_subcategory: dict[str, list[int]] = defaultdict(list)
    for index, subcategory in enumerate(data.subcategories):
        by_subcategory[subcategory].append(index)
    groups = []
    for indices in by_subcategory.values():
        rng.shuffle(indices)
        groups.extend(indices[i : i + group_size] for i in range(0, len(indices), group_size))
    rng.shuffle(groups)
    batch: list[int] = []
    for group in groups:
        batch.extend(group)
        if len(batch) >= batch_size:
            yield batch[:batch_size]
            batch = batch[batch_size:]
    if len(batch) > 1:
        yield batch


def prepare_data(
    catalogue: Catalogue, patch_features: np.ndarray, tokenizer: PreTrainedTokenizerBase, max_text_len: int
) -> TrainingData:
    """Tokenize every text once, so batches only pad."""
    token_ids = tokenizer([item.text for item in catalogue.items], truncation=True, max_length=max_text_len)[
        "input_ids"
    ]
    return TrainingData(catalogue, [list(ids) for ids in token_ids], patch_features)


def catalogue_features(
    catalogue: Catalogue,
    cache_root: str | Path,
    patch_config: PatchFeatureConfig,
    device: str | torch.device = "cpu",
    view: str | None = None,
) -> tuple[Catalogue, np.ndarray]:
    """Patch features of every item with a readable image (of its photo seen through `view`, `model.views`),
    from the cache (computed once on a miss, on `device`: auto, cpu or cuda)."""
    extractor = PatchFeatureExtractor(patch_config, device=pick_device(device))
    return FeatureCache(cache_root, extractor, view=view).features_for(catalogue)


def split_with_features(
    catalogue: Catalogue, features: np.ndarray, val_fraction: float, seed: int = 0
) -> tuple[tuple[Catalogue, np.ndarray], tuple[Catalogue, np.ndarray]]:
    """The group-disjoint (train, validation) split, each side with its rows of `features`."""
    row = {item.id: i for i, item in enumerate(catalogue.items)}
    train, validation = catalogue.split(val_fraction=val_fraction, seed=seed)
    pick = lambda part: features[[row[item.id] for item in part.items]]  # noqa: E731
    return (train, pick(train)), (validation, pick(validation))
