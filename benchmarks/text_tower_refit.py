"""Does the text tower gain from more training against the locked image towers, each text ranked against
every train image?

    python benchmarks/text_tower_refit.py --model runs/hm-len64-adaptive/best --data hm:../shared/data/hm

The mirror of `fit-image-tower` (stop 30's "every train text as a false text"): with the checkpoint's image
towers locked, every train image's embedding is at hand, so each text of a batch is ranked against all of
them (and each image against the batch's texts), and only the text tower (the encoder and its projection)
moves. A step runs the encoder on the batch's texts alone, no joint pass. Then the image towers are refitted
to the moved text tower as `fashionbert fit-image-tower` does. Prints the towers' figures on `fashionbert
eval`'s 1,000 validation queries (gallery R@1 / R@10 and sampled R@1 by cosine, as
`benchmarks/tower_negatives.py`) before, during and after.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from tower_negatives import FitSplits, add_fit_arguments

from model.checkpoint import read_summary, save_checkpoint
from model.evaluation import text_codes
from model.tower_fit import TowerFitConfig, fit_image_tower
from model.training import warmup_cosine


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
        default=0,
        help="rank each image against every train text too, held in a memory re-encoded every N steps "
        "(each step writes its batch's rows); 0: against the batch's texts only",
    )
    parser.add_argument("--save", default=None, help="write the checkpoint with the refitted towers here")
    args = parser.parse_args()

    splits = FitSplits.load(args)
    inference, train, val = splits.inference, splits.train, splits.val
    model = inference.model
    torch.manual_seed(args.seed)
    codes = torch.from_numpy(text_codes(train))
    train_ids = inference.tokenize([item.text for item in train.items])
    val_ids = inference.tokenize([item.text for item in val.items])
    # Locked image side: every train photo and every view through the fitted towers.
    looks = [splits.train_features, *splits.views]
    images = torch.stack([torch.from_numpy(inference.encode_images(grids)) for grids in looks])  # (V, n, E)
    val_images = inference.encode_images(splits.val_features)
    scale = float(model.logit_scale.detach().exp().clamp(max=100))

    def measure() -> str:
        return splits.measure(val_images, inference.encode_token_ids(val_ids))

    print(f"before: {measure()}", flush=True)
    params = [
        {"params": list(model.bert.parameters()), "lr": args.lr},
        {"params": list(model.text_projection.parameters()), "lr": 10 * args.lr},
    ]
    optimizer = torch.optim.AdamW(params, weight_decay=0.01)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    generator = torch.Generator().manual_seed(args.seed)
    memory = torch.zeros(0) if args.text_memory else None
    started = time.monotonic()
    for step in range(args.steps):
        model.train()
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base * warmup_cosine(step, 20, args.steps)
        batch = torch.randperm(len(train), generator=generator)[: args.batch_size]
        look = torch.randint(len(looks), (1,), generator=generator).item()
        ids, mask = inference.pad([train_ids[i] for i in batch.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            texts = model.encode_text(ids, mask).float()  # (B, E)
        every = images[look]  # (n, E)
        same = (codes[batch][:, None] == codes[None, :]).float()  # (B, n): identical texts share images
        text_to_image = F.cross_entropy(scale * texts @ every.T, same / same.sum(1, keepdim=True))
        if memory is None:
            in_batch = same[:, batch]  # (B, B)
            image_to_text = F.cross_entropy(
                scale * every[batch] @ texts.T, in_batch / in_batch.sum(1, keepdim=True)
            )
        else:  # each image against every train text: the memory's, the batch's own rows fresh
            if step % args.text_memory == 0:
                model.eval()
                memory = torch.from_numpy(inference.encode_token_ids(train_ids))
                model.train()
            bank = memory.index_copy(0, batch, texts)  # (n, E)
            image_to_text = F.cross_entropy(scale * every[batch] @ bank.T, same / same.sum(1, keepdim=True))
            memory[batch] = texts.detach()
        loss = (text_to_image + image_to_text) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            print(
                f"step {step + 1} loss {loss.item():.3f} ({time.monotonic() - started:.0f} s): {measure()}",
                flush=True,
            )
    model.eval()
    train_texts = inference.encode_token_ids(train_ids)
    started = time.monotonic()
    config = TowerFitConfig(towers=args.towers, seed=args.seed)
    fit_image_tower(model, train_texts, splits.train_features, text_codes(train), config, 0, splits.views)
    val_texts = inference.encode_token_ids(val_ids)
    refitted = inference.encode_images(splits.val_features)
    print(f"towers refitted ({time.monotonic() - started:.0f} s): {splits.measure(refitted, val_texts)}")
    if args.save:
        summary = read_summary(args.model) | {"text_tower_refit": vars(args)}
        save_checkpoint(model.eval(), inference.tokenizer, args.save, summary)


if __name__ == "__main__":
    main()
