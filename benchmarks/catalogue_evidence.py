"""Can evidence from the catalogue beside the towers' cosine fix the sampled protocol's misses?

    python benchmarks/catalogue_evidence.py --model runs/hm-listwise3-recipe/best --data hm:../shared/data/hm

A third of the 1,000 sampled queries defeat every run of the recipe (benchmarks/RESULTS.md, "Whole runs
as an ensemble"): their partner loses to an item of the same product type. H&M labels every article with
more than the text says (department, section, colour group, graphical appearance ...), and the train
split is a memory of 8,908 matched pairs. Three measures, all on the sampled protocol by the towers'
cosine (the term that decides the served logit), i2t / t2i:

- oracle: each query's candidates cut to those sharing its value of one attribute, the validation labels
  read. A ceiling for what that attribute could add, not a method.
- attributes: per attribute, a linear classifier from each side's content (image: the towers' embedding
  and the pooled patch feature; text: the text tower's embedding), fitted on the train split's labels;
  the pair's agreement `log sum_a p_image(a) p_text(a)` is added to the served `scale x cosine` with a
  weight w.
- memory: each validation image's nearest train images (softmax of the towers' image-image cosine at
  sharpness beta) stand for it by their texts, compared with a candidate text in the text space, and the
  mirror for texts; the mean of both bridges is added to the cosine with a weight w.

A weight (and beta) is picked on one half of the queries and reported on the other, both ways, so no
figure is tuned on the queries it is measured on.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable

import numpy as np
import torch
from rerank_fusion import load_split
from tower_negatives import TowerMeasure

from model.catalogue import Catalogue
from model.inference import FashionBertInference
from model.metrics import rank_of_positive

ATTRIBUTES = (
    "department_name",
    "section_name",
    "colour_group_name",
    "perceived_colour_master_name",
    "graphical_appearance_name",
    "garment_group_name",
)


def labels(split: Catalogue, attribute: str) -> list[str]:
    return [item.metadata.get(attribute, "") for item in split.items]


def log_probabilities(
    train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray, classes: int, steps: int = 400
) -> np.ndarray:
    """(n, classes) log-probabilities of a linear classifier fitted on standardised `train_x`."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train = torch.from_numpy(((train_x - mean) / std).astype(np.float32))
    target = torch.from_numpy(train_y)
    torch.manual_seed(0)
    linear = torch.nn.Linear(train.shape[1], classes)
    optimizer = torch.optim.AdamW(linear.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(linear(train), target, label_smoothing=0.1).backward()
        optimizer.step()
    with torch.no_grad():
        return torch.log_softmax(linear(torch.from_numpy(((x - mean) / std).astype(np.float32))), -1).numpy()


def softmax(x: np.ndarray, beta: float) -> np.ndarray:
    z = beta * (x - x.max(1, keepdims=True))
    p = np.exp(z)
    return p / p.sum(1, keepdims=True)


def normalised(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class SampledProtocol:
    """The sampled protocol's R@1 by `scale x cosine + w x extra` (extra: an (images, texts) matrix over
    the split), on all queries or one half of them."""

    def __init__(self, measure: TowerMeasure, images: np.ndarray, texts: np.ndarray, scale: float) -> None:
        self.measure, self.scale = measure, scale
        self.cosine = {
            "i2t": measure.sampled_cosine(images, texts),
            "t2i": measure.sampled_cosine(texts, images),
        }
        self.halves = np.arange(len(measure.sampled_queries)) % 2

    def r1(self, direction: str, extra: np.ndarray | None, weight: float, half: int | None = None) -> float:
        q, cand = self.measure.sampled_queries, self.measure.candidates
        score = self.scale * self.cosine[direction]
        if extra is not None and weight:
            # extra's rows are images, its columns texts: i2t reads (query, candidate), t2i the transpose
            score = score + weight * (
                extra[q[:, None], cand] if direction == "i2t" else extra[cand, q[:, None]]
            )
        hit = rank_of_positive(score, self.measure.correct) == 1
        return float(100 * (hit if half is None else hit[self.halves == half]).mean())

    def held_out(
        self, direction: str, settings: dict[str, Callable[[], np.ndarray]], weights: list[float]
    ) -> str:
        """Each half's best (setting, weight) reported on the other half; the mean of the two."""
        extras = {name: make() for name, make in settings.items()}
        figures, picks = [], []
        for pick_half in (0, 1):
            name, weight = max(
                itertools.product(extras, weights),
                key=lambda s: self.r1(direction, extras[s[0]], s[1], pick_half),
            )
            figures.append(self.r1(direction, extras[name], weight, 1 - pick_half))
            picks.append(f"{name} w {weight:g}")
        base = np.mean([self.r1(direction, None, 0, half) for half in (0, 1)])
        return f"{direction} {base:.1f} -> {np.mean(figures):.1f} (picked: {'; '.join(picks)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument(
        "--data", required=True, help="catalogue SPEC (train split fits, validation measures)"
    )
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument(
        "--attributes", default=",".join(ATTRIBUTES), help="metadata columns, comma-separated"
    )
    args = parser.parse_args()

    inference = FashionBertInference.from_checkpoint(args.model, device="cpu")
    (train, train_features), (val, val_features) = (
        load_split(args.data, inference, part) for part in ("train", "validation")
    )
    measure = TowerMeasure(val, args.queries)
    train_images, val_images = inference.encode_images(train_features), inference.encode_images(val_features)
    train_texts = inference.encode_texts([item.text for item in train.items])
    val_texts = inference.encode_texts([item.text for item in val.items])
    scale = float(inference.model.logit_scale.detach().exp())
    protocol = SampledProtocol(measure, val_images, val_texts, scale)
    print(f"towers (scale {scale:.1f}): {measure(val_images, val_texts)}", flush=True)

    attributes = args.attributes.split(",")
    q, cand = measure.sampled_queries, measure.candidates
    print("\noracle: candidates cut to the query's value (validation labels read)")
    for attribute in attributes:
        value = np.array(labels(val, attribute))
        shares = value[cand] == value[q][:, None]
        cut = {d: np.where(shares, protocol.cosine[d], -np.inf) for d in ("i2t", "t2i")}
        r1 = [100 * (rank_of_positive(cut[d], measure.correct) == 1).mean() for d in ("i2t", "t2i")]
        print(
            f"  {attribute}: {r1[0]:.1f} / {r1[1]:.1f} ({100 * shares[:, 1:].mean():.0f}% of negatives share it)"
        )

    print("\nattributes: linear classifiers on each side's content, fitted on the train split")
    image_inputs = [
        np.concatenate([images, grids.mean(1)], 1)
        for images, grids in ((train_images, train_features), (val_images, val_features))
    ]
    agreement = {}
    for attribute in attributes:
        train_labels, val_labels = labels(train, attribute), labels(val, attribute)
        names = sorted(set(train_labels))
        index = {name: k for k, name in enumerate(names)}
        y = np.array([index[name] for name in train_labels])
        val_y = np.array([index.get(name, -1) for name in val_labels])
        image_lp = log_probabilities(image_inputs[0], y, image_inputs[1], len(names))
        text_lp = log_probabilities(train_texts, y, val_texts, len(names))
        agreement[attribute] = np.log(np.exp(image_lp) @ np.exp(text_lp).T + 1e-9)  # (images, texts)
        print(
            f"  {attribute}: {len(names)} values, validation accuracy image {100 * (image_lp.argmax(1) == val_y).mean():.1f}"
            f", text {100 * (text_lp.argmax(1) == val_y).mean():.1f}",
            flush=True,
        )
    settings = {attribute: (lambda a=attribute: agreement[a]) for attribute in attributes}
    settings["all"] = lambda: sum(agreement.values())
    for direction in ("i2t", "t2i"):
        print("  " + protocol.held_out(direction, settings, [0.1, 0.25, 0.5, 1.0, 2.0]))

    print("\nmemory: the train split's pairs as a bridge between the modalities")
    image_to_train, text_to_train = val_images @ train_images.T, val_texts @ train_texts.T

    def bridge(beta: float) -> np.ndarray:
        as_text = normalised(softmax(image_to_train, beta) @ train_texts) @ val_texts.T  # (images, texts)
        as_image = val_images @ normalised(softmax(text_to_train, beta) @ train_images).T  # (images, texts)
        return (as_text + as_image) / 2

    memory = {f"beta {beta}": (lambda b=beta: bridge(b)) for beta in (10, 30, 100)}
    for direction in ("i2t", "t2i"):
        print("  " + protocol.held_out(direction, memory, [1.0, 2.5, 5.0, 10.0, 20.0]))


if __name__ == "__main__":
    main()
