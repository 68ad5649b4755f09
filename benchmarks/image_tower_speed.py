"""How long the image towers take, stacked (as served) against one member at a time (as before stop 25).

    python benchmarks/image_tower_speed.py --model runs/hm-fusion5/best

`FashionBert.encode_image` runs the ensemble's members as batched matmuls over stacked weights
(model.fashionbert.StackedMLP). The baseline rebuilds each member as the `nn` layers it stacks (what
checkpoints before stop 25 held, one `nn.Sequential` per member and path) and runs them one after another,
with the same bf16 weights and autocast the service uses, on one thread as the service's model thread does.
Prints the median of `--rounds` rounds (the two take turns) for a single query and an index batch, and the
ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.fashionbert import FashionBert, StackedMLP, mlp
from model.inference import FashionBertInference
from model.precision import bf16_autocast

CPU = torch.device("cpu")


def member_layers(stacked: StackedMLP, k: int) -> nn.Sequential:
    """Member k of `stacked` as the `nn` layers it was before stacking."""
    layers = mlp(stacked.weight1.shape[1], *stacked.weight2.shape[1:]).to(stacked.weight1.dtype)
    with torch.no_grad():
        layers[0].weight.copy_(stacked.norm_weight[k])
        layers[0].bias.copy_(stacked.norm_bias[k])
        layers[1].weight.copy_(stacked.weight1[k].T)
        layers[1].bias.copy_(stacked.bias1[k])
        layers[3].weight.copy_(stacked.weight2[k].T)
        layers[3].bias.copy_(stacked.bias2[k])
    return layers


def one_at_a_time(model: FashionBert) -> Callable[[torch.Tensor], torch.Tensor]:
    """`encode_image` as it ran before: each member's layers in turn, then the normalised mean."""
    towers = model.image_towers
    members = [
        (member_layers(towers.projection, k), member_layers(towers.colour, k) if towers.colour else None)
        for k in range(len(towers))
    ]

    def encode(patch_features: torch.Tensor) -> torch.Tensor:
        pooled = patch_features.float().mean(1).to(towers.dtype)
        embeddings = []
        for projection, colour in members:
            embedding = projection(pooled[:, : towers.cnn_dim])
            if colour is not None:
                embedding = embedding + colour(pooled[:, towers.cnn_dim :])
            embeddings.append(F.normalize(embedding.float(), dim=-1))
        return F.normalize(torch.stack(embeddings).mean(0), dim=-1)

    return encode


def time_call(encode: Callable[[torch.Tensor], torch.Tensor], patches: torch.Tensor, repeats: int) -> float:
    """Milliseconds per call of `encode(patches)`, after one warm-up call."""
    encode(patches)
    started = time.perf_counter()
    for _ in range(repeats):
        encode(patches)
    return (time.perf_counter() - started) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch-sizes", default="1,256", help="a query, and an index build's batch")
    args = parser.parse_args()
    torch.set_num_threads(1)
    inference = FashionBertInference.from_checkpoint(args.model, device="cpu", bf16_weights=True)
    model = inference.model
    baseline = one_at_a_time(model)
    print(f"{len(model.image_towers)} image towers, bf16 weights, one thread")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        patches = torch.from_numpy(
            np.random.default_rng(0).random(
                (batch, model.config.num_patches, model.config.patch_feature_dim), np.float32
            )
        )
        with torch.inference_mode(), bf16_autocast(CPU):
            difference = (model.encode_image(patches) - baseline(patches)).abs().max().item()
            repeats = max(3, 400 // batch)
            times: dict[str, list[float]] = {"stacked": [], "one at a time": []}
            for _ in range(args.rounds):
                times["stacked"].append(time_call(model.encode_image, patches, repeats))
                times["one at a time"].append(time_call(baseline, patches, repeats))
        stacked, sequential = (statistics.median(times[name]) for name in ("stacked", "one at a time"))
        print(
            f"batch {batch}: stacked {stacked:.2f} ms, one at a time {sequential:.2f} ms "
            f"({sequential / stacked:.2f}x), median of {args.rounds}; largest difference {difference:.1e}"
        )


if __name__ == "__main__":
    main()
