"""Is the image tower what holds recall back? Re-fit it against the fixed text tower and compare.

    python benchmarks/image_tower_refit.py --model runs/hm-listwise/best --data hm:../shared/data/hm
    python benchmarks/image_tower_refit.py ... --colour --towers mean,colour --seeds 0,1
    python benchmarks/image_tower_refit.py --untrained --data hm:../shared/data/hm --colour \
        --towers colour,mean --image-size 384   # which photo size gives the patch network more to say
    python benchmarks/image_tower_refit.py --untrained ... --backbone efficientnet-lite2  # which patch network

The text tower's embeddings of the train split are computed once and held fixed; a fresh image tower is
fitted to them with the symmetric InfoNCE loss (items with identical text count as positives of each
other; since stop 30 `fit_tower` ranks each image against every train text, so image-to-text figures
come out about a point higher than those measured before: benchmarks/RESULTS.md, "Every train text as a false text"),
then the validation gallery is searched with it (R@1 / R@10 of `fashionbert eval`'s 1,000 queries). Two
towers: the model's own design (mean of the patch grid, then an MLP), and attention pooling over the 64
patches (a learned query over the projected patches plus their position, added to the mean path), which
can weigh the garment over the background. Fitting costs seconds, not a training run, since the text
tower does not move. Equal figures say the frozen patch network's features, not the pooling,
bound recall. `--colour` adds a third tower: the mean path plus the model's colour path (model/colour.py)
on the image's colour histogram, read from the colour extractor's cache (`fashionbert features --data
SPEC` fills it); the other towers see the same CNN features as before. `--towers bands --bands K` adds to the
colour tower a layout path on the grid's rows averaged into K horizontal bands (where a feature sits, which the
mean forgets; benchmarks/RESULTS.md, "Where a feature sits"). `--ensemble` also prints, after
each seed, the figures of the embeddings averaged over that tower's seeds so far (what `fashionbert
fit-image-tower --towers K` serves), and `--scale` sets the InfoNCE temperature (`fit-image-tower` uses the
model's own):

    python benchmarks/image_tower_refit.py --model runs/hm-fusion5/listwise/best --data hm:../shared/data/hm \
        --colour --towers colour --seeds 0,1,2,3,4,5,6,7 --ensemble --scale 18.78
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from rerank_fusion import load_split
from torch import nn

from model.config import FashionBertConfig
from model.evaluation import _embedding_search, draw_queries, text_codes
from model.fashionbert import FashionBert, colour_path, mlp
from model.inference import FashionBertInference
from model.metrics import recall_at_k
from model.patch_features import PatchFeatureConfig
from model.precision import bf16_autocast
from model.tower_fit import TowerFitConfig, fit_tower
from model.training import build_model

CPU = torch.device("cpu")


def fresh_tower_mlp(model: FashionBert, extra_inputs: int = 0) -> nn.Sequential:
    """A freshly initialised `mlp` of the shape of the model's image tower members (StackedMLP stacks these),
    reading `extra_inputs` more features after the CNN's."""
    cnn_dim, hidden = model.image_towers.projection.weight1.shape[1:]
    return mlp(cnn_dim + extra_inputs, hidden, model.image_towers.projection.weight2.shape[2])


class MeanPoolTower(nn.Module):
    """The model's own image tower (`FashionBert.encode_image`): mean of the grid, then a freshly initialised
    MLP of the shape of its members (`fresh_tower_mlp`)."""

    def __init__(self, mlp: nn.Sequential):
        super().__init__()
        self.mlp = mlp
        self.cnn_dim = self.mlp[0].normalized_shape[0]  # patches may carry colour histograms after these

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed(patches.mean(1)), dim=-1)

    def embed(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.mlp(pooled[:, : self.cnn_dim])


class ColourTower(MeanPoolTower):
    """The mean path plus a colour path on the image's colour histogram (`FashionBert.encode_image` of a model
    that reads colour), both fitted here."""

    def __init__(self, mlp: nn.Sequential, colour_dim: int):
        super().__init__(mlp)
        self.colour = colour_path(colour_dim, self.mlp[-1].out_features)

    def embed(self, pooled: torch.Tensor) -> torch.Tensor:
        return super().embed(pooled) + self.colour(pooled[:, self.cnn_dim :])


class BandsTower(ColourTower):
    """The colour tower plus a layout path: the patch grid's rows averaged into `bands` horizontal bands,
    concatenated, through an MLP of the members' shape, added to the output. The mean forgets where a feature
    sits; a band keeps whether it is at the neckline or the hem, which tells a cropped top from a long one."""

    def __init__(self, mean_mlp: nn.Sequential, colour_dim: int, bands: int, grid: int):
        super().__init__(mean_mlp, colour_dim)
        if grid % bands:
            raise SystemExit(f"error: --bands {bands} must divide the patch grid's {grid} rows")
        self.bands, self.grid = bands, grid
        self.layout = mlp(bands * self.cnn_dim, mean_mlp[1].out_features, mean_mlp[-1].out_features)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        batch = len(patches)
        rows = patches[..., : self.cnn_dim].reshape(batch, self.grid, self.grid, self.cnn_dim).mean(2)
        bands = rows.reshape(batch, self.bands, self.grid // self.bands, self.cnn_dim).mean(2)
        return F.normalize(self.embed(patches.mean(1)) + self.layout(bands.flatten(1)), dim=-1)


class AttentionPoolTower(nn.Module):
    """A learned query attends over the projected patches (plus their grid position); added to the mean path."""

    def __init__(self, feature_dim: int, hidden: int, embed_dim: int, num_patches: int, heads: int = 4):
        super().__init__()
        self.patch_projection = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, hidden))
        self.position = nn.Parameter(torch.zeros(num_patches, hidden))
        self.query = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        self.attention = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.mean_projection = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, hidden))
        self.out = nn.Sequential(nn.GELU(), nn.Linear(hidden, embed_dim))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        patches = patches[..., : self.patch_projection[0].normalized_shape[0]]
        keys = self.patch_projection(patches) + self.position  # (B, N, H)
        attended, _ = self.attention(self.query.expand(len(patches), -1, -1), keys, keys)  # (B, 1, H)
        return F.normalize(self.out(attended.squeeze(1) + self.mean_projection(patches.mean(1))), dim=-1)


def fit(
    tower: nn.Module, patches: np.ndarray, texts: torch.Tensor, codes: np.ndarray, args: argparse.Namespace
) -> None:
    config = TowerFitConfig(
        steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed
    )
    codes_t = torch.from_numpy(codes)
    images = torch.from_numpy(patches)
    fit_tower(
        lambda batch: tower(images[batch].float()),
        tower.parameters(),
        texts,
        codes_t,
        args.scale,
        config,
        200,
    )


@torch.no_grad()
def embed(tower: nn.Module, patches: np.ndarray) -> np.ndarray:
    tower.eval()
    with bf16_autocast(CPU):
        rows = [
            tower(torch.from_numpy(patches[i : i + 256].astype(np.float32))).float()
            for i in range(0, len(patches), 256)
        ]
    return torch.cat(rows).numpy()


def gallery_recalls(images: np.ndarray, texts: np.ndarray, codes: np.ndarray, queries: np.ndarray) -> str:
    """Gallery R@1 / R@10 both ways for the `queries` rows, as `fashionbert eval` ranks embeddings."""
    cells = []
    for direction, (asked, searched) in (("i2t", (images, texts)), ("t2i", (texts, images))):
        ranks, *_ = _embedding_search(asked[queries], searched, codes[queries], codes, 10)
        recalls = recall_at_k(ranks, (1, 10))
        cells.append(f"{direction} R@1 {recalls['R@1']:.1f} R@10 {recalls['R@10']:.1f}")
    return ", ".join(cells)


def ensemble_embeddings(members: list[np.ndarray]) -> np.ndarray:
    """The members' (n, E) embeddings averaged and L2-normalised again: what an ensemble of image towers
    serves (`fit-image-tower --towers K`)."""
    return F.normalize(torch.from_numpy(np.mean(members, 0)), dim=-1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_source = parser.add_mutually_exclusive_group(required=True)
    model_source.add_argument("--model", help="checkpoint folder (its text tower is kept)")
    model_source.add_argument(
        "--untrained",
        action="store_true",
        help="the default model before training (pretrained text model, fresh heads): compares patch "
        "features (--image-size) without a training run",
    )
    parser.add_argument(
        "--data", required=True, help="catalogue SPEC (train split fits, validation measures)"
    )
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--scale", type=float, default=25.0, help="InfoNCE logit scale (the model's is 24.9)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument(
        "--seeds", default="0", help="comma-separated seeds: each tower is fitted once per seed"
    )
    parser.add_argument(
        "--towers",
        default="mean,attention",
        help="comma-separated subset of mean, attention, colour, bands",
    )
    parser.add_argument(
        "--bands", type=int, default=4, help="the bands tower's horizontal bands (a divisor of the grid)"
    )
    parser.add_argument(
        "--colour", action="store_true", help="read colour histograms too (needed by the colour tower)"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="fit on patch features of photos letterboxed to this size (default: the model's)",
    )
    parser.add_argument(
        "--backbone",
        default=None,
        help="fit on patch features of another patch network (default: the model's)",
    )
    parser.add_argument(
        "--ensemble", action="store_true", help="also rank by each tower's embeddings averaged over its seeds"
    )
    args = parser.parse_args()

    if args.untrained:
        torch.manual_seed(0)
        config = FashionBertConfig().with_patch_features(PatchFeatureConfig(colour=True))
        inference = FashionBertInference(*build_model(config, pretrained=True), device="cpu")
    else:
        inference = FashionBertInference.from_checkpoint(args.model, device="cpu")
    patch_config = PatchFeatureConfig.from_dict(inference.config.patch_features)
    if args.colour:
        patch_config = replace(patch_config, colour=True)
    if args.image_size:
        patch_config = replace(patch_config, image_size=args.image_size)
    if args.backbone:
        patch_config = replace(patch_config, backbone=args.backbone)
    (train, train_patches), (val, val_patches) = (
        load_split(args.data, inference, part, patch_config=patch_config) for part in ("train", "validation")
    )
    train_texts = torch.from_numpy(inference.encode_texts([i.text for i in train.items]))
    val_texts = inference.encode_texts([i.text for i in val.items])
    codes = text_codes(val)
    queries = draw_queries(len(val), args.queries, np.random.default_rng(0))  # fashionbert eval's queries

    def gallery(images: np.ndarray) -> str:
        return gallery_recalls(images, val_texts, codes, queries)

    model, config = inference.model, inference.model.config
    hidden, embed_dim = model.bert.config.hidden_size, config.embed_dim
    own_features = not (args.image_size or args.backbone)  # its own tower reads only what it was trained on
    if args.model and own_features:
        own = val_patches[..., : config.patch_feature_dim]
        print(f"the model's own image tower: {gallery(inference.encode_images(own))}", flush=True)
    towers = {
        "mean": ("mean pool, re-fitted", lambda: MeanPoolTower(fresh_tower_mlp(model))),
        "attention": (
            "attention pool, fitted",
            lambda: AttentionPoolTower(config.cnn_feature_dim, hidden, embed_dim, config.num_patches),
        ),
        "colour": (
            "mean pool + colour histogram, fitted",
            lambda: ColourTower(fresh_tower_mlp(model), patch_config.colour_dim),
        ),
        "bands": (
            f"mean pool + colour histogram + {args.bands} horizontal bands, fitted",
            lambda: BandsTower(
                fresh_tower_mlp(model), patch_config.colour_dim, args.bands, patch_config.grid
            ),
        ),
    }
    for key in args.towers.split(","):
        name, build = towers[key]
        if key in ("colour", "bands") and not args.colour:
            raise SystemExit(f"error: the {key} tower needs --colour")
        members: list[np.ndarray] = []
        for seed in (int(seed) for seed in args.seeds.split(",")):
            torch.manual_seed(seed)
            args.seed = seed
            tower = build().float()
            print(f"{name}, seed {seed}:", flush=True)
            fit(tower, train_patches, train_texts, text_codes(train), args)
            members.append(embed(tower, val_patches))
            print(f"{name}, seed {seed}: {gallery(members[-1])}", flush=True)
            if args.ensemble:
                print(
                    f"{name}, ensemble of {len(members)}: {gallery(ensemble_embeddings(members))}", flush=True
                )


if __name__ == "__main__":
    main()
