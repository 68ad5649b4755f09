"""The feature cache's host-side pace: photos/s through `FeatureCache.features_for` when the patch network
costs nothing, as on a GPU, where reading, hashing, decoding, letterboxing, the colour histograms and
the cache writes set the pace instead.

    python benchmarks/feature_host_path.py --data hm:../shared/data/hm --n 1000 --repeats 3

The network's forward is replaced by zeros of its output shape; everything else is the real pipeline,
on an empty cache each repeat. Prints the median photos/s. On this 2-core machine: about 270 (H&M,
1,000 photos). `fashionbert features` on the H200 machine of stop 35, the real network on its GPU, made
93: run this there to see whether the host side is what held it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from unittest import mock

import torch

from model.catalogue import load_catalogue
from model.feature_cache import FeatureCache
from model.patch_features import PatchFeatureConfig, PatchFeatureExtractor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="hm:../shared/data/hm")
    parser.add_argument("--n", type=int, default=1000, help="photos per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()

    catalogue = load_catalogue(args.data, limit=args.n)
    extractor = PatchFeatureExtractor(PatchFeatureConfig())
    cnn_dim = extractor.config.feature_dim - extractor.config.colour_dim

    def free_network(self: PatchFeatureExtractor, pixels: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(pixels), self.num_patches, cnn_dim)

    rates = []
    with mock.patch.object(PatchFeatureExtractor, "forward", free_network):
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as cache:
                start = time.perf_counter()
                kept, _ = FeatureCache(cache, extractor).features_for(
                    catalogue, batch_size=args.batch_size, progress=False
                )
                rates.append(len(kept) / (time.perf_counter() - start))
    print(
        f"{len(catalogue)} photos, network free: {statistics.median(rates):.0f} photos/s "
        f"(median of {args.repeats}: {', '.join(f'{r:.0f}' for r in rates)})"
    )


if __name__ == "__main__":
    main()
