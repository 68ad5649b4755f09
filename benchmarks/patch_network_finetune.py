"""Does fine-tuning the top of the patch network lift recall? Fit the image tower with and without it.

    python benchmarks/patch_network_finetune.py --model runs/hm-recipe/best --data hm:../shared/data/hm

benchmarks/RESULTS.md "The image tower is not the bottleneck" found recall bounded by what the frozen EfficientNet-Lite0
features hold: re-fitting the tower or pooling the patches by attention changed nothing. This measures the
lever it names. The network's trunk (stem and blocks before `--first-block`) stays frozen and is run once
per image (its feature maps are cached under `--trunk-cache`); the blocks from `--first-block` on, the
1x1 head convolution, and a fresh copy of the model's image tower (MLP on the pooled map plus the colour
path on the image's colour histogram) are fitted to the locked text tower of `--model` with the symmetric
InfoNCE loss of `fashionbert fit-image-tower`. `--cnn-lr 0` is the baseline in the same code path: the
top stays as pretrained and only the tower is fitted (what `fit-image-tower` does). Prints the gallery
R@1 / R@10 of `fashionbert eval`'s 1,000 validation queries every `--eval-every` steps; with several
`--seeds`, one tower (and top) is fitted per seed and the ensemble of their averaged embeddings is measured
too, as the model serves its image towers. `--trunk-pool` asks
whether the frozen network holds more than its last layer gives: the tower also reads the trunk's map
(entering `--first-block`) pooled by mean and max, beside the head's pooled features.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from image_tower_refit import ensemble_embeddings, fresh_tower_mlp, gallery_recalls
from rerank_fusion import load_split
from torch import nn

from model.catalogue import Catalogue
from model.evaluation import draw_queries, text_codes
from model.fashionbert import colour_path
from model.inference import FashionBertInference
from model.patch_features import PatchFeatureConfig, PatchFeatureExtractor, get_backbone
from model.precision import bf16_autocast
from model.tower_fit import TowerFitConfig, fit_tower

CPU = torch.device("cpu")


class TunedTower(nn.Module):
    """Trunk feature map -> the network's blocks from `first_block` on and head -> pooled -> MLP, plus the
    colour path on the image's mean colour histogram. BatchNorm keeps its ImageNet statistics (eval mode)."""

    def __init__(
        self, net: nn.Module, first_block: int, mlp: nn.Sequential, colour_dim: int, trunk_pool: bool = False
    ):
        super().__init__()
        self.trunk_pool = trunk_pool
        self.blocks = nn.ModuleList(net._blocks[first_block:])
        self.head = nn.Sequential(net._conv_head, net._bn1, net._swish)
        self.mlp = mlp
        self.colour = colour_path(colour_dim, self.mlp[-1].out_features)

    def cnn_parameters(self) -> list[nn.Parameter]:
        return [*self.blocks.parameters(), *self.head.parameters()]

    def train(self, mode: bool = True) -> TunedTower:
        super().train(mode)
        self.blocks.eval()  # BatchNorm statistics stay ImageNet's; no drop connect
        self.head.eval()
        return self

    def pooled(self, maps: torch.Tensor) -> torch.Tensor:
        x = maps
        for block in self.blocks:
            x = block(x)
        pooled = self.head(x).mean((2, 3))  # (B, 1280): the global average pool the model's tower reads
        if self.trunk_pool:
            pooled = torch.cat([pooled, maps.mean((2, 3)), maps.amax((2, 3))], dim=1)
        return pooled

    def embed(self, pooled: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
        embedding = self.mlp(pooled)
        if self.colour is not None:
            embedding = embedding + self.colour(colour)
        return F.normalize(embedding.float(), dim=-1)


@torch.no_grad()
def trunk_maps(catalogue: Catalogue, extractor: PatchFeatureExtractor, first_block: int) -> np.ndarray:
    """(n, C, h, w) float16 feature maps entering block `first_block`, from the frozen (folded) network."""
    net, rows, started = extractor.net, [], time.monotonic()
    for start in range(0, len(catalogue.items), 32):
        items = catalogue.items[start : start + 32]
        pixels = np.stack([extractor.preprocess(catalogue.open_image(item)) for item in items])
        with bf16_autocast(CPU):
            x = extractor.normalize(pixels)
            x = net._swish(net._bn0(net._conv_stem(x)))
            for block in net._blocks[:first_block]:
                x = block(x)
        rows.append(x.float().numpy().astype(np.float16))
        if start % 1024 == 0:
            print(
                f"trunk maps: {start + len(items)} / {len(catalogue.items)} ({time.monotonic() - started:.0f} s)"
            )
    return np.concatenate(rows)


def cached_trunk_maps(
    catalogue: Catalogue, extractor: PatchFeatureExtractor, first_block: int, path: Path | None
) -> np.ndarray:
    if path is not None and path.exists():
        return np.load(path, allow_pickle=False)
    maps = trunk_maps(catalogue, extractor, first_block)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path.with_suffix(".tmp.npy"), maps)
        path.with_suffix(".tmp.npy").rename(path)
    return maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder (its text tower is kept)")
    parser.add_argument(
        "--data", required=True, help="catalogue SPEC (train split fits, validation measures)"
    )
    parser.add_argument("--first-block", type=int, default=15, help="first trained block (of 16)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3, help="the tower MLPs'")
    parser.add_argument("--cnn-lr", type=float, default=1e-4, help="the network's top; 0 keeps it frozen")
    parser.add_argument("--scale", type=float, default=25.0, help="InfoNCE logit scale (the model's is 24.9)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument(
        "--seeds", default="0", help="comma-separated seeds: one fit each, then their embeddings averaged"
    )
    parser.add_argument("--trunk-cache", type=Path, default=None, help="folder for the trunk's feature maps")
    parser.add_argument(
        "--trunk-pool", action="store_true", help="the tower also reads the trunk's map, mean and max pooled"
    )
    args = parser.parse_args()

    inference = FashionBertInference.from_checkpoint(args.model, device="cpu")
    model = inference.model
    patch_config = PatchFeatureConfig.from_dict(inference.config.patch_features)
    (train, train_patches), (val, val_patches) = (
        load_split(args.data, inference, part) for part in ("train", "validation")
    )
    cnn_dim = model.config.cnn_feature_dim
    train_colour = torch.from_numpy(train_patches[..., cnn_dim:].astype(np.float32).mean(1))
    val_colour = torch.from_numpy(val_patches[..., cnn_dim:].astype(np.float32).mean(1))
    train_texts = torch.from_numpy(inference.encode_texts([i.text for i in train.items]))
    val_texts = inference.encode_texts([i.text for i in val.items])
    train_codes, val_codes = torch.from_numpy(text_codes(train)), text_codes(val)
    queries = draw_queries(len(val), args.queries, np.random.default_rng(0))  # fashionbert eval's queries

    extractor = PatchFeatureExtractor(patch_config)
    cache = args.trunk_cache
    train_maps, val_maps = (
        torch.from_numpy(
            cached_trunk_maps(
                part,
                extractor,
                args.first_block,
                cache / f"{name}-block{args.first_block}-{extractor.fingerprint()[:12]}.npy"
                if cache
                else None,
            )
        )
        for name, part in (("train", train), ("validation", val))
    )
    print(f"trunk maps: train {tuple(train_maps.shape)}, validation {tuple(val_maps.shape)}", flush=True)

    @torch.no_grad()
    def val_embeddings(tower: TunedTower) -> np.ndarray:
        pooled = pooled_all(tower, val_maps)
        with bf16_autocast(CPU):
            return tower.embed(pooled, val_colour).float().numpy()

    def gallery(images: np.ndarray) -> str:
        return gallery_recalls(images, val_texts, val_codes, queries)

    backbone = get_backbone(patch_config.backbone)
    members: list[np.ndarray] = []
    for seed in (int(seed) for seed in args.seeds.split(",")):
        torch.manual_seed(seed)
        net = backbone.build()  # each seed tunes its own copy of the network's top
        net.load_state_dict(torch.load(extractor.weights_path, map_location="cpu", weights_only=True))
        # With --trunk-pool the MLP also reads the trunk's channels twice (mean, max).
        tower_mlp = fresh_tower_mlp(model, extra_inputs=2 * train_maps.shape[1] if args.trunk_pool else 0)
        tower = TunedTower(
            net, args.first_block, tower_mlp, patch_config.colour_dim, trunk_pool=args.trunk_pool
        ).float()
        print(f"seed {seed}:", flush=True)
        fit(
            tower,
            train_maps,
            train_colour,
            train_texts,
            train_codes,
            args,
            seed,
            lambda tower: gallery(val_embeddings(tower)),
        )
        members.append(val_embeddings(tower))
        if len(members) > 1:
            print(f"ensemble of {len(members)}: {gallery(ensemble_embeddings(members))}", flush=True)


def fit(
    tower: TunedTower,
    train_maps: torch.Tensor,
    train_colour: torch.Tensor,
    train_texts: torch.Tensor,
    train_codes: torch.Tensor,
    args: argparse.Namespace,
    seed: int,
    report: Callable[[TunedTower], str],
) -> None:
    """Fit `tower` to the locked text tower's `train_texts`; the network's top too unless `--cnn-lr 0`."""
    frozen = args.cnn_lr == 0
    if frozen:
        tower.requires_grad_(False)
    head_params = [*tower.mlp.parameters(), *(tower.colour.parameters() if tower.colour else [])]
    for p in head_params:
        p.requires_grad_(True)
    train_pooled = pooled_all(tower, train_maps) if frozen else None

    def embed(batch: torch.Tensor) -> torch.Tensor:
        tower.train()  # `report` leaves it in eval mode
        pooled = train_pooled[batch] if frozen else tower.pooled(train_maps[batch].float())
        return tower.embed(pooled, train_colour[batch])

    groups = [{"params": head_params, "lr": args.lr, "weight_decay": 0.05}]
    if not frozen:
        groups.append({"params": tower.cnn_parameters(), "lr": args.cnn_lr, "weight_decay": 0.0})
    config = TowerFitConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, seed=seed)
    fit_tower(
        embed,
        groups,
        train_texts,
        train_codes,
        args.scale,
        config,
        args.eval_every,
        report=lambda: report(tower),
    )


@torch.no_grad()
def pooled_all(tower: TunedTower, maps: torch.Tensor) -> torch.Tensor:
    """(n, D) pooled features of (n, C, h, w) trunk maps through the tower's network top."""
    tower.eval()
    with bf16_autocast(CPU):
        return torch.cat([tower.pooled(maps[i : i + 256].float()).float() for i in range(0, len(maps), 256)])


if __name__ == "__main__":
    main()
