"""What the towers get wrong: the validation gallery's top-1 mistakes, sorted by what the wrong item shares
with the right one.

    python benchmarks/gallery_mistakes.py --model runs/hm-s31/best --data hm:../shared/data/hm

For `fashionbert eval`'s 1,000 gallery queries in each direction, ranked by the recall embeddings alone,
each query whose top item is wrong is put in a class by what that item has in common with the true one:
the same product (another colour of one `product_code`), the same colour group, the same product type
(sub-category) and, for H&M, the same graphical appearance (solid, stripe, print ...). The shares say which
lever is left: before the colour histograms most mistakes named another colour (README, "Colour
histograms"); after them most share colour and type and differ in what only the description's details say.
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
from rerank_fusion import load_split

from model.catalogue import Item
from model.evaluation import EvalConfig, _embedding_search, draw_queries, text_codes
from model.inference import FashionBertInference

TRAITS = {
    "product": lambda item: item.group,
    "colour": lambda item: item.metadata.get("colour_group_name"),
    "type": lambda item: item.subcategory,
    "pattern": lambda item: item.metadata.get("graphical_appearance_name"),
}


def shared_traits(wrong: Item, right: Item) -> tuple[str, ...]:
    """The traits (TRAITS' names) the wrong answer has in common with the right one."""
    return tuple(name for name, trait in TRAITS.items() if trait(wrong) == trait(right))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="catalogue SPEC (its validation split is measured)")
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args()

    inference = FashionBertInference.from_checkpoint(args.model, device="cpu")
    val, features = load_split(args.data, inference, "validation")
    texts = inference.encode_texts([item.text for item in val.items])
    images = inference.encode_images(features)
    codes = text_codes(val)
    queries = draw_queries(len(val), args.queries, np.random.default_rng(EvalConfig().seed))
    for direction, (asked, searched) in (("i2t", (images, texts)), ("t2i", (texts, images))):
        _, top, _ = _embedding_search(asked[queries], searched, codes[queries], codes, 1)
        top = top[:, 0]
        wrong = codes[top] != codes[queries]
        classes = Counter(
            shared_traits(val.items[t], val.items[q]) for q, t in zip(queries[wrong], top[wrong], strict=True)
        )
        mistakes = int(wrong.sum())
        print(
            f"{direction}: R@1 {100 * (1 - mistakes / len(queries)):.1f}, {mistakes} mistakes; the wrong item shares"
        )
        for name in TRAITS:
            share = sum(count for traits, count in classes.items() if name in traits) / mistakes
            print(f"  {name:>8}: {100 * share:5.1f}%")
        for traits, count in classes.most_common(5):
            print(f"  {100 * count / mistakes:5.1f}%  {' + '.join(traits) or 'nothing'}")


if __name__ == "__main__":
    main()
