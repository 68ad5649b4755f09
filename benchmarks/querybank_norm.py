"""How much does querybank normalisation of the towers' scores raise gallery recall, for which beta?

    python benchmarks/querybank_norm.py --model runs/hm-listwise/best --data hm:../shared/data/hm

Hub items (an image close to many texts) crowd the top of many queries' lists. The inverted softmax of
querybank normalisation (Bogolin et al., CVPR 2022) divides each query's softmax over the gallery by how
strongly a bank of other queries already pulls each gallery item:

    score(q, g) = cos(q, g) - logsumexp_b(beta x cos(b, g)) / beta

a per-item offset (`model.querybank`), which bundles built with a bank store and the service subtracts.
The bank here is the *train* split's texts (for text-to-image) or images (for image-to-text), disjoint
from the validation queries, so nothing about the queries leaks into the offsets; `--bank-data` takes
texts of another catalogue instead. Prints R@1/5/10 of the 1,000 `fashionbert eval` queries over the
validation split (or, with `--gallery catalogue`, the whole catalogue, the bank's items included) for a
range of beta (0 = plain cosine; the model's own contrastive temperature is the untuned choice that
bundles and `fashionbert eval --querybank` use).
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
from rerank_fusion import load_split

from model.catalogue import load_catalogue
from model.evaluation import _embedding_search, draw_queries, text_codes
from model.inference import FashionBertInference
from model.metrics import recall_at_k
from model.querybank import QueryBank, draw_bank, group_hashes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--data", required=True, help="catalogue SPEC (validation = gallery, train = bank)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--betas", default="0,10,20,30,50", help="inverse temperatures to try")
    parser.add_argument(
        "--gallery",
        choices=("validation", "catalogue"),
        default="validation",
        help="search the validation split (as `fashionbert eval`), or the whole catalogue (as a served "
        "bundle: the same validation queries among the train items too)",
    )
    parser.add_argument(
        "--bank-data",
        default=None,
        metavar="SPEC",
        help="a bank of texts from another catalogue instead of the train split (text-to-image only: its "
        "images would need patch features of their own)",
    )
    parser.add_argument("--bank-items", type=int, default=9000, help="--bank-data items drawn (seed 0)")
    args = parser.parse_args()

    inference = FashionBertInference.from_checkpoint(args.model, device="cpu")
    (train, train_patches), (val, val_patches) = (
        load_split(args.data, inference, part) for part in ("train", "validation")
    )
    queries = draw_queries(len(val), args.queries, np.random.default_rng(0))  # fashionbert eval's queries
    searched, searched_patches = val, val_patches
    if args.gallery == "catalogue":  # train items first, so the queries' rows move down by len(train)
        searched = train.subset([*train.items, *val.items])
        searched_patches = np.concatenate([train_patches, val_patches])
        queries = queries + len(train)
    gallery = {
        "text": inference.encode_texts([item.text for item in searched.items]),
        "image": inference.encode_images(searched_patches),
    }
    groups = group_hashes([item.group for item in searched.items])
    codes = text_codes(searched)
    own_scale = float(inference.model.logit_scale.detach().exp())
    betas = sorted({float(b) for b in args.betas.split(",")} | {round(own_scale, 1)})
    if args.bank_data:
        other = load_catalogue(args.bank_data)
        rows = draw_bank(len(other), args.bank_items)
        texts = inference.encode_texts([other.items[i].text for i in rows])
        # No bank images: the text gallery (image-to-text) stays plain.
        groups_of_bank = group_hashes([other.items[i].group for i in rows])
        encoded = QueryBank(texts, texts[:0], groups_of_bank, own_scale)
        described = f"{len(rows)} texts of {args.bank_data}"
    else:
        encoded = QueryBank.encode(inference, train, train_patches, beta=own_scale)
        described = f"{len(train)} train items"
    print(f"{len(searched)} gallery items, {len(queries)} queries, bank of {described}")
    share = "  top-1 train items i2t/t2i" if args.gallery == "catalogue" else ""
    print(f"{'beta':>6}  {'i2t R@1/5/10':>18}  {'t2i R@1/5/10':>18}{share}")
    for beta in betas:
        bank = None if beta == 0 else dataclasses.replace(encoded, beta=beta)
        cells, shares = [], []
        for query_side, gallery_side in (("image", "text"), ("text", "image")):
            plain = bank is None or (gallery_side == "text" and not len(bank.images))
            offsets = None if plain else bank.offsets(gallery_side, gallery[gallery_side], groups)[0]
            ranks, top, _ = _embedding_search(
                gallery[query_side][queries], gallery[gallery_side], codes[queries], codes, 10, offsets
            )
            shares.append(f"{100 * (top[:, 0] < len(train)).mean():.0f}%")  # train items come first
            recalls = recall_at_k(ranks, (1, 5, 10))
            cells.append("/".join(f"{recalls[f'R@{k}']:.1f}" for k in (1, 5, 10)))
        label = f"{beta:g}" + (" (model's)" if beta == round(own_scale, 1) else "")
        share = f"  {'/'.join(shares):>26}" if args.gallery == "catalogue" else ""
        print(f"{label:>6}  {cells[0]:>18}  {cells[1]:>18}{share}")


if __name__ == "__main__":
    main()
