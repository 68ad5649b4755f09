"""How many word pieces of a description should the text tower read? Re-read them at other cuts, then refit.

    python benchmarks/text_length.py --model runs/hm-s31/best --data hm:../shared/data/hm --lengths 48,64,96

`max_text_len` (FashionBertConfig, `fashionbert train --max-text-len`) cuts every text the model reads, the
text tower's and the joint pass's alike. H&M's descriptions run to a median of 45 word pieces and a 90th
percentile of 69, so the default of 48 cuts 41% of them, and what it cuts is the end of `detail_desc`: the
cut, sleeves and fastenings that tell apart two garments of one colour and type (most of the gallery's
top-1 mistakes, benchmarks/RESULTS.md "Text length"). For each cut this encodes the train and validation texts with the
checkpoint's trained text tower, measures the towers as they are (their image tower was fitted to texts
cut at the checkpoint's own length), then refits the image towers to the re-read train texts as
`fashionbert fit-image-tower` does (8 towers on the photos and their views) and measures again: R@1 /
R@10 over the validation gallery and the sampled protocol's R@1 by the towers' cosine, on `fashionbert
eval`'s 1,000 queries (`tower_negatives.TowerMeasure`). The encoder is not retrained: a cut that wins here
is worth a training run at it (`benchmarks/train_recipe.sh --max-text-len N`).
"""

from __future__ import annotations

import argparse
import time

from tower_negatives import FitSplits, add_fit_arguments

from model.tower_fit import TowerFitConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_fit_arguments(parser)
    parser.add_argument(
        "--lengths", default="48,64,96", help="word pieces per text, [CLS] and [SEP] included"
    )
    args = parser.parse_args()

    splits = FitSplits.load(args)
    inference, train, val = splits.inference, splits.train, splits.val
    measure = splits.measure
    trained_images = inference.encode_images(splits.val_features)

    print(
        f"trained at {inference.config.max_text_len} word pieces; {args.towers} towers from seed {args.seed}"
    )
    for length in map(int, args.lengths.split(",")):
        inference.config.max_text_len = length  # encode_texts cuts every text here
        started = time.perf_counter()
        train_texts = inference.encode_texts([item.text for item in train.items])
        val_texts = inference.encode_texts([item.text for item in val.items])
        print(
            f"{length:>4} as trained ({time.perf_counter() - started:.0f} s to encode the texts): "
            f"{measure(trained_images, val_texts)}",
            flush=True,
        )
        started = time.perf_counter()
        images = splits.refit(train_texts, TowerFitConfig(towers=args.towers, seed=args.seed))
        print(
            f"{length:>4} refitted ({time.perf_counter() - started:.0f} s): {measure(images, val_texts)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
