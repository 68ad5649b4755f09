"""Can the joint pass learn to match on its own, and does that help re-ranking?

    python benchmarks/head_learning.py --model runs/hm-listwise/best --data hm:../shared/data/hm
    python benchmarks/head_learning.py ... --items 256 --steps 150 --random-steps 150   # the over-fit check
    python benchmarks/head_learning.py ... --separate --fusion-layer 0   # a cross-encoder of its own

Trains the cross-encoder's head alone (the alignment logit without the towers' cosine term, see
`FashionBert.alignment_head_logits`) with a listwise loss in both directions: each text against its own
image and `candidates - 1` false images, each image against its own text and false texts. The false items
are drawn uniformly from the train split for the first `random_steps`, then a `hard_fraction` of them from
each item's 30 nearest by tower cosine (the confusions re-ranking meets). The towers keep their in-batch
contrastive loss, since the text tower shares the encoder. With `--separate` the cross-encoder is a copy of its
own: the towers' embeddings are taken once from the checkpoint and stay fixed (what serving two encoders
would give), and the copy trains on the listwise loss alone, from `--fusion-layer` up jointly.

Every `eval_every` steps, on validation items it prints:
- `block10`: mean rank of an item's partner among 10 random items by the head alone (chance 5.5): can the
  head match at all?
- for each direction, R@1 over the validation gallery when the towers' top `top_k` are re-ordered by
  head + w x cosine, for a range of w (w = 0: the head alone; `emb`: the towers alone): does it add to them?
With `--check-train` the same on as many trained-on items: does the head fit them, or fail to generalise?
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from head_interaction import partner_ranks
from rerank_fusion import load_split

from model.checkpoint import save_checkpoint
from model.evaluation import text_codes
from model.inference import FashionBertInference
from model.losses import contrastive_loss
from model.precision import bf16_autocast
from model.training import mine_neighbours, warmup_cosine

CPU = torch.device("cpu")
WEIGHTS = (0.0, 2.5, 5.0, 10.0, 20.0, 40.0)


class HeadLearning:
    """One experiment: the checkpoint, both splits in memory, the head-only training loop and its checks."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        torch.manual_seed(args.seed)
        self.rng = np.random.default_rng(args.seed)
        self.inference = FashionBertInference.from_checkpoint(args.model, device="cpu")
        self.model = self.inference.model.float()
        self.train, self.train_patches = load_split(args.data, self.inference, "train")
        self.val, self.val_patches = load_split(args.data, self.inference, "validation")
        self.train_tokens = self.inference.tokenize([item.text for item in self.train.items])
        self.val_tokens = self.inference.tokenize([item.text for item in self.val.items])
        self.train_codes, self.val_codes = text_codes(self.train), text_codes(self.val)
        n = len(self.train)
        self.items = np.arange(n) if args.items is None else self.rng.choice(n, args.items, replace=False)
        # A separate cross-encoder's recall towers are the checkpoint's for good: (texts, images) taken once.
        # Otherwise (None) they move with the shared encoder and are encoded afresh wherever needed.
        self.train_embeddings = self.val_embeddings = None
        if args.separate:
            self.train_embeddings = self.encode(self.train_tokens, self.train_patches)
            self.val_embeddings = self.encode(self.val_tokens, self.val_patches)
        if args.check_train:  # as many trained-on items as validation has, ranked among themselves
            self.train_check = self.rng.choice(self.items, min(len(self.val), len(self.items)), replace=False)
        if args.fusion_layer is not None:
            self.model.config.fusion_layer = args.fusion_layer
            self.model.check_fusion_layer()

    def encode(self, tokens: list[list[int]], patches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The model's tower embeddings now: (texts, images)."""
        return self.inference.encode_token_ids(tokens), self.inference.encode_images(patches)

    def towers(
        self, tokens: list[list[int]], patches: np.ndarray, frozen: tuple[np.ndarray, np.ndarray] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The recall towers' (texts, images) embeddings: the frozen ones of a separate cross-encoder."""
        return self.encode(tokens, patches) if frozen is None else frozen

    def head(self, token_ids: list[list[int]], patches: np.ndarray) -> torch.Tensor:
        """The head of the joint pass alone: (P,) logits of the pairs (token_ids[i], patches[i])."""
        model = self.model
        ids, mask = self.inference.pad(token_ids)
        with bf16_autocast(CPU):
            pooled = model.pool_patches(torch.from_numpy(np.asarray(patches, np.float32)))
            return model.alignment_head_logits(model.joint_hidden(ids, mask, pooled), mask).float()

    def evaluate(self, tag: str) -> None:
        """The checks on the validation items, and with --check-train on trained-on ones too."""
        self.model.eval()
        self.evaluate_split(
            f"{tag} validation", self.val_tokens, self.val_patches, self.val_codes, self.val_embeddings
        )
        if self.args.check_train:
            check = self.train_check
            frozen = None if self.train_embeddings is None else tuple(e[check] for e in self.train_embeddings)
            tokens = [self.train_tokens[i] for i in check]
            self.evaluate_split(
                f"{tag} train", tokens, self.train_patches[check], self.train_codes[check], frozen
            )
        self.model.train()

    @torch.no_grad()
    def evaluate_split(
        self,
        tag: str,
        tokens: list[list[int]],
        patches: np.ndarray,
        codes: np.ndarray,
        frozen: tuple[np.ndarray, np.ndarray] | None,
    ) -> None:
        args, rng = self.args, np.random.default_rng(1)
        # block10: partner rank among 10 random items of the split, head alone.
        ranks = []
        for _ in range(25):
            block = rng.choice(len(tokens), 10, replace=False)
            text_of, image_of = (a.ravel() for a in np.meshgrid(block, block, indexing="ij"))
            scores = self.head([tokens[i] for i in text_of], patches[image_of]).reshape(10, 10).numpy()
            ranks.extend(partner_ranks(scores))
        line = [f"{tag}: block10 rank {np.mean(ranks):.2f} (chance 5.5)"]
        # Gallery R@1 when the towers' top K are re-ordered by head + w x cosine.
        texts, images = self.towers(tokens, patches, frozen)
        queries = rng.choice(len(tokens), min(args.queries, len(tokens)), replace=False)
        for direction in ("t2i", "i2t"):
            hits = dict.fromkeys(("emb", *WEIGHTS), 0)
            for q in queries:
                cosine = texts[q] @ images.T if direction == "t2i" else images[q] @ texts.T
                top = np.argsort(-cosine)[: args.top_k]
                correct = codes[top] == codes[q]
                hits["emb"] += int(correct[0])
                if not correct.any():
                    continue
                if direction == "t2i":
                    head = self.head([tokens[q]] * len(top), patches[top]).numpy()
                else:
                    head = self.head([tokens[j] for j in top], patches[np.full(len(top), q)]).numpy()
                for w in WEIGHTS:
                    hits[w] += int(correct[np.argmax(head + w * cosine[top])])
            cells = " ".join(
                f"{k if k == 'emb' else f'w{k:g}'} {100 * v / len(queries):.1f}" for k, v in hits.items()
            )
            line.append(f"  {direction} R@1 (top {args.top_k}): {cells}")
        print("\n".join(line), flush=True)

    def false_items(self, item: int, neighbours: torch.Tensor, hard: bool) -> list[int]:
        """`candidates - 1` other items with a text different from `item`'s."""
        args, picked = self.args, []
        pool = neighbours[item][neighbours[item] >= 0].numpy()
        while len(picked) < args.candidates - 1:
            if hard and len(pool) and self.rng.random() < args.hard_fraction:
                other = int(self.rng.choice(pool))
            else:
                other = int(self.rng.choice(self.items))
            if self.train_codes[other] != self.train_codes[item] and other not in picked:
                picked.append(other)
        return picked

    def run(self) -> None:
        args, model, rng = self.args, self.model, self.rng
        tokens, patches = self.train_tokens, self.train_patches
        self.evaluate("before")
        t2i, i2t = mine_neighbours(*self.towers(tokens, patches, self.train_embeddings), self.train_codes, 30)
        model.train()
        encoder = list(model.bert.parameters())
        encoder_ids = {id(p) for p in encoder}
        new = [p for p in model.parameters() if id(p) not in encoder_ids]
        optimizer = torch.optim.AdamW(
            [{"params": encoder, "lr": args.lr}, {"params": new, "lr": args.head_lr}], weight_decay=0.01
        )
        base_lrs = [group["lr"] for group in optimizer.param_groups]
        started = time.monotonic()
        for step in range(args.steps):
            factor = warmup_cosine(step, 20, args.steps)
            for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = base * factor
            hard = step >= args.random_steps
            batch = rng.choice(self.items, min(args.texts, len(self.items)), replace=False)
            text_of, image_of = [], []
            for i in batch:  # a text against images, then an image against texts
                for j in [i, *self.false_items(i, t2i, hard)]:
                    text_of.append(i)
                    image_of.append(j)
                for j in [i, *self.false_items(i, i2t, hard)]:
                    text_of.append(j)
                    image_of.append(i)
            logits = self.head([tokens[i] for i in text_of], patches[image_of]).reshape(-1, args.candidates)
            alignment = F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long))
            optimizer.zero_grad()
            if args.separate:  # the towers are not this model's: the listwise loss alone
                alignment.backward()
                contrastive = torch.zeros(())
            else:
                contrastive = self.contrastive(rng)
                (alignment + contrastive).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if step % 25 == 0:
                print(
                    f"step {step} listwise {alignment.item():.3f} contrastive {contrastive.item():.3f} "
                    f"{'hard' if hard else 'random'} negatives, {time.monotonic() - started:.0f} s",
                    flush=True,
                )
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                self.evaluate(f"step {step + 1}")
                if args.out:
                    model.eval()
                    save_checkpoint(model, self.inference.tokenizer, args.out, {"head_learning": vars(args)})
                    model.train()

    def contrastive(self, rng: np.random.Generator) -> torch.Tensor:
        """The towers' in-batch contrastive loss on 32 random items, which keeps them up when they share the
        encoder with the joint pass."""
        model, tokens, patches = self.model, self.train_tokens, self.train_patches
        towers = rng.choice(self.items, min(32, len(self.items)), replace=False)
        ids, mask = self.inference.pad([tokens[i] for i in towers])
        with bf16_autocast(CPU):
            text_embeddings = model.encode_text(ids, mask)
            image_embeddings = model.encode_image(torch.from_numpy(patches[towers].astype(np.float32)))
        return contrastive_loss(text_embeddings, image_embeddings, model.logit_scale.exp().clamp(max=100))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder to start from")
    parser.add_argument(
        "--data", required=True, help="catalogue SPEC (train split trains, validation measures)"
    )
    parser.add_argument("--items", type=int, default=None, help="train on this many random train items only")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--random-steps", type=int, default=200, help="steps with uniform false items only")
    parser.add_argument("--hard-fraction", type=float, default=0.5, help="then: share from tower neighbours")
    parser.add_argument("--lr", type=float, default=5e-5, help="encoder learning rate")
    parser.add_argument("--head-lr", type=float, default=1e-3, help="head, patch embeddings, projections")
    parser.add_argument("--texts", type=int, default=16, help="items per step (each ranked both ways)")
    parser.add_argument("--candidates", type=int, default=4, help="true + false pairs per ranking")
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument(
        "--top-k", type=int, default=20, help="tower candidates re-ordered in the gallery check"
    )
    parser.add_argument("--queries", type=int, default=300, help="validation queries per direction")
    parser.add_argument("--out", default=None, help="save the trained model here after each evaluation")
    parser.add_argument(
        "--separate", action="store_true", help="a cross-encoder of its own: the towers stay as loaded"
    )
    parser.add_argument(
        "--fusion-layer", type=int, default=None, help="joint from this layer up (default: the checkpoint's)"
    )
    parser.add_argument(
        "--check-train", action="store_true", help="also check on trained-on items: fitting or generalising?"
    )
    parser.add_argument("--seed", type=int, default=0)
    HeadLearning(parser.parse_args()).run()


if __name__ == "__main__":
    main()
