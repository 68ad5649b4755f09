"""Patch-feature throughput: whole-image vs per-patch mode, float32 vs bfloat16 autocast.

    python benchmarks/patch_features.py --data hm:../shared/data/hm --n 256 --repeats 3
    python benchmarks/patch_features.py --modes whole --image-sizes 256,384 --batch-size 1  # a query's cost
    python benchmarks/patch_features.py --modes whole --backbones efficientnet-lite0,efficientnet-lite2,...

"model" times the extractor on letterboxed pixels already in memory; "decode" times reading,
decoding and letterboxing alone; "model+decode" is the two one after the other for one image.
The last lines time the real pipeline (`FeatureCache.features_for`, decoding overlapped with the
model, bfloat16) on an empty cache and then on the filled one.
"""

from __future__ import annotations

import argparse
import io
import itertools
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from model.catalogue import load_catalogue  # noqa: E402
from model.feature_cache import FeatureCache  # noqa: E402
from model.patch_features import PatchFeatureConfig, PatchFeatureExtractor  # noqa: E402
from model.patches import letterbox  # noqa: E402


def median_rate(n: int, repeats: int, work: Callable[[], object]) -> float:
    """Images per second: n over the median wall time of `repeats` runs of `work`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return n / statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", default="hm:../shared/data/hm", help="catalogue spec (default: %(default)s)"
    )
    parser.add_argument("--n", type=int, default=256, help="images to time (default: %(default)s)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs, the median is shown (default: %(default)s)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)"
    )
    parser.add_argument(
        "--modes", default="whole,per_patch", help="comma-separated patch modes (default: %(default)s)"
    )
    parser.add_argument(
        "--image-sizes", default="256", help="comma-separated letterbox sizes (default: %(default)s)"
    )
    parser.add_argument(
        "--backbones",
        default="efficientnet-lite0",
        help="comma-separated patch networks; repeat them to alternate (default: %(default)s)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    catalogue = load_catalogue(args.data, limit=args.n)
    images = [catalogue.image_bytes(item) for item in catalogue]
    n = len(images)
    cpu = "?"
    if Path("/proc/cpuinfo").is_file():
        names = [
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0].split(":", 1)[1].strip() if names else "?"
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU {cpu}"
    print(
        f"{n} images from {args.data}; {device}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"batch size {args.batch_size}, median of {args.repeats} runs after one warm-up batch\n")

    def decode_all(size: int) -> np.ndarray:
        return np.stack([letterbox(Image.open(io.BytesIO(data)), size) for data in images])

    # Decoding and letterboxing depend on the size alone: timed once per size, not per backbone and mode.
    sizes, modes = [int(size) for size in args.image_sizes.split(",")], args.modes.split(",")
    decoded = {
        size: (median_rate(n, args.repeats, lambda size=size: decode_all(size)), decode_all(size))
        for size in sizes
    }
    rows = []
    for backbone, size, mode in itertools.product(args.backbones.split(","), sizes, modes):
        config = PatchFeatureConfig(backbone=backbone, mode=mode, image_size=size)
        extractor = PatchFeatureExtractor(config, device=args.device)
        decode_rate, pixels = decoded[size]
        for precision, autocast in (("float32", False), ("bfloat16", True)):

            def run(
                extractor: PatchFeatureExtractor = extractor,
                pixels: np.ndarray = pixels,
                autocast: bool = autocast,
            ) -> None:
                for start in range(0, n, args.batch_size):
                    extractor.extract_pixels(pixels[start : start + args.batch_size], autocast=autocast)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()

            extractor.extract_pixels(pixels[: args.batch_size], autocast=autocast)  # warm-up
            model_rate = median_rate(n, args.repeats, run)
            serial_rate = 1.0 / (1.0 / model_rate + 1.0 / decode_rate)
            rows.append((backbone, size, mode, precision, model_rate, decode_rate, serial_rate))

    header = ("backbone", "size", "mode", "precision", "model img/s", "decode img/s", "model+decode img/s")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for backbone, size, mode, precision, model_rate, decode_rate, serial_rate in rows:
        rates = f"{model_rate:.1f} | {decode_rate:.1f} | {serial_rate:.1f}"
        print(f"| {backbone} | {size} | {mode} | {precision} | {rates} |")

    extractor = PatchFeatureExtractor(device=args.device)
    with tempfile.TemporaryDirectory() as root:
        cache = FeatureCache(root, extractor)
        start = time.perf_counter()
        cache.features_for(catalogue, batch_size=args.batch_size, progress=False)
        cold = n / (time.perf_counter() - start)
        start = time.perf_counter()
        cache.features_for(catalogue, batch_size=args.batch_size, progress=False)
        warm = n / (time.perf_counter() - start)
    print(
        f"\nFeatureCache.features_for, whole, bfloat16: {cold:.1f} img/s empty cache, {warm:.1f} img/s cached"
    )
    print(f"(decode threads: {min(4, os.cpu_count() or 1)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
