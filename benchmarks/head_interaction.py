"""Does the cross-encoder's head score pairs, or a text prior plus an image prior?

    python benchmarks/head_interaction.py --model runs/hm-listwise/best --data hm:../shared/data/hm

Scores every text against every image of random blocks of validation items three ways: the head of the
joint pass alone (the tower term zeroed), the served logit (head + tower_scale x cosine) and the towers'
cosine. For each it prints the share of variance that is a per-text effect, a per-image effect and their
interaction (`model.metrics.pair_score_shares`), and the mean rank of each item's own partner among the
block (both directions; chance is (block + 1) / 2). A head whose interaction share is near zero cannot
re-rank: among near neighbours it can only re-order by priors (see benchmarks/rerank_fusion.py).
"""

from __future__ import annotations

import argparse

import numpy as np
from rerank_fusion import load_split

from model.evaluation import _match_pairs
from model.inference import FashionBertInference
from model.metrics import pair_score_shares


def partner_ranks(scores: np.ndarray) -> tuple[float, float]:
    """Mean 1-based rank of the diagonal in each column (texts for an image) and each row (images for a text)."""
    diagonal = np.diag(scores)
    text_for_image = 1 + (scores > diagonal[None, :]).sum(0)
    image_for_text = 1 + (scores > diagonal[:, None]).sum(1)
    return float(text_for_image.mean()), float(image_for_text.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--data", required=True, help="catalogue SPEC (its validation split is sampled)")
    parser.add_argument("--split", choices=("validation", "train"), default="validation")
    parser.add_argument("--block", type=int, default=32, help="items per block: block x block pairs")
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    inference = FashionBertInference.from_checkpoint(args.model, device="cpu")
    catalogue, patches = load_split(args.data, inference, args.split)
    scale = float(inference.model.tower_scale.detach())
    rng = np.random.default_rng(args.seed)
    n = args.block
    rows = {"head alone": [], "served (head + tower)": [], "tower cosine": []}
    for _ in range(args.blocks):
        items = rng.choice(len(catalogue), n, replace=False)
        token_ids = inference.tokenize([catalogue.items[i].text for i in items])
        texts, images = inference.encode_token_ids(token_ids), inference.encode_images(patches[items])
        text_index, image_index = (a.ravel() for a in np.meshgrid(np.arange(n), np.arange(n), indexing="ij"))
        zeros = np.zeros(n * n, np.float32)
        head = _match_pairs(
            inference, token_ids, patches[items], text_index, image_index, 128, tower_similarity=zeros
        ).reshape(n, n)
        cosine = texts @ images.T  # (n, n): text i, image j
        for name, scores in zip(rows, (head, head + scale * cosine, cosine), strict=True):
            rows[name].append((pair_score_shares(scores), partner_ranks(scores)))

    print(
        f"{args.blocks} blocks of {n} {args.split} items; tower_scale {scale:.2f}; chance rank {(n + 1) / 2:.1f}"
    )
    print(f"{'score':<24} {'text':>6} {'image':>6} {'inter.':>6} {'rank i2t':>9} {'rank t2i':>9}")
    for name, results in rows.items():
        shares = {key: np.mean([r[0][key] for r in results]) for key in ("text", "image", "interaction")}
        i2t, t2i = np.mean([r[1] for r in results], axis=0)
        print(
            f"{name:<24} {shares['text']:6.3f} {shares['image']:6.3f} {shares['interaction']:6.3f} "
            f"{i2t:9.1f} {t2i:9.1f}"
        )


if __name__ == "__main__":
    main()
