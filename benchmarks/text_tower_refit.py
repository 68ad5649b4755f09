"""Does the text tower gain from more training against the locked image towers, each text ranked against
every train image?

    python benchmarks/text_tower_refit.py --model runs/hm-len64-adaptive/best --data hm:../shared/data/hm

The mirror of `fit-image-tower` (stop 30's "every train text as a false text"): with the checkpoint's image
towers locked, every train image's embedding is at hand, so each text of a batch is ranked against all of
them (and each image against every train text, held in a memory; `--text-memory 0`: the batch's texts), and
only the text tower (the encoder and its projection) moves: `model.tower_fit.fit_text_tower`, what
`fashionbert fit-image-tower --text-steps` runs. A step runs the encoder on the batch's texts alone, no
joint pass. Then the image towers are refitted to the moved text tower as `fit-image-tower` does. Prints
the towers' figures on `fashionbert eval`'s 1,000 validation queries (gallery R@1 / R@10 and sampled R@1 by
cosine, as `benchmarks/tower_negatives.py`) before, during and after.
"""

from __future__ import annotations

import argparse
import time

import torch
from tower_negatives import FitSplits, add_fit_arguments

from model.checkpoint import read_summary, save_checkpoint
from model.evaluation import text_codes
from model.tower_fit import TextTowerFitConfig, TowerFitConfig, fit_image_tower, fit_text_tower


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_fit_arguments(parser)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-5, help="encoder; the projection takes 10x")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument(
        "--text-memory",
        type=int,
        default=TextTowerFitConfig.refresh_every,
        help="rank each image against every train text, held in a memory re-encoded every N steps "
        "(each step writes its batch's rows; default %(default)s); 0: against the batch's texts only",
    )
    parser.add_argument("--save", default=None, help="write the checkpoint with the refitted towers here")
    args = parser.parse_args()

    splits = FitSplits.load(args)
    inference, train, val = splits.inference, splits.train, splits.val
    model = inference.model
    torch.manual_seed(args.seed)
    train_ids = inference.tokenize([item.text for item in train.items])
    token_ids, mask = inference.pad(train_ids)
    val_ids = inference.tokenize([item.text for item in val.items])
    # Locked image side: every train photo and every view through the fitted towers.
    looks = [splits.train_features, *splits.views]
    images = torch.stack([torch.from_numpy(inference.encode_images(grids)) for grids in looks])  # (V, n, E)
    val_images = inference.encode_images(splits.val_features)

    def measure() -> str:
        model.eval()
        return splits.measure(val_images, inference.encode_token_ids(val_ids))

    print(f"before: {measure()}", flush=True)
    config = TextTowerFitConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        refresh_every=args.text_memory,
        seed=args.seed,
    )
    texts = inference.encode_token_ids(train_ids)
    _, moved = fit_text_tower(
        model, token_ids, mask, texts, images, text_codes(train), config, args.eval_every, measure
    )
    train_texts = moved.cpu().numpy()
    started = time.monotonic()
    image_config = TowerFitConfig(towers=args.towers, seed=args.seed)
    fit_image_tower(
        model, train_texts, splits.train_features, text_codes(train), image_config, 0, splits.views
    )
    val_texts = inference.encode_token_ids(val_ids)
    refitted = inference.encode_images(splits.val_features)
    print(f"towers refitted ({time.monotonic() - started:.0f} s): {splits.measure(refitted, val_texts)}")
    if args.save:
        summary = read_summary(args.model) | {"text_tower_refit": vars(args)}
        save_checkpoint(model.eval(), inference.tokenizer, args.save, summary)


if __name__ == "__main__":
    main()
