"""bf16 autocast against fp32 on this machine's CPU (or GPU), whatever the project's precision rule picks:
the evidence behind `model/precision.py`.

    python benchmarks/precision_speed.py --repeats 5

Four workloads, each in fp32 and under bf16 autocast, the two taking turns within each repeat so machine
noise hits both alike: a square matrix multiply; the patch network (EfficientNet-Lite0, the real weights)
over `--photos` letterboxed photos, as `fashionbert features` runs it; one query's re-rank pass, the
cross-encoder over `--pairs` (text, image) pairs with a MiniLM-shaped encoder (random weights: only the
arithmetic is timed); and that pass forward and backward, as a training step computes it. Prints what the
CPU offers, what the rule picks, the median seconds of each and the bf16 speed-up (below 1: a slow-down).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from transformers import BertConfig

from model.config import DEFAULT_TEXT_MODEL, FashionBertConfig, resolve_text_model
from model.fashionbert import FashionBert
from model.inference import pick_device
from model.patch_features import PatchFeatureConfig, PatchFeatureExtractor
from model.precision import cpu_has, precision_name


def workloads(device: torch.device, size: int, photos: int, pairs: int) -> dict[str, Callable[[], None]]:
    """name -> a no-argument call that does the work once (on `device`, under whatever autocast is on)."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)

    extractor = PatchFeatureExtractor(PatchFeatureConfig(), device=device)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (photos, extractor.config.image_size, extractor.config.image_size, 3))
    batch = extractor.normalize(pixels.astype(np.uint8))

    bert = BertConfig.from_pretrained(resolve_text_model(DEFAULT_TEXT_MODEL)).to_dict()
    model = FashionBert(FashionBertConfig(bert=bert)).to(device).eval()
    config = model.config
    ids = torch.randint(1000, 20000, (pairs, 24), device=device)  # a short description's word pieces
    mask = torch.ones_like(ids)
    patches = torch.randn(pairs, config.encoder_patches, config.patch_feature_dim, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def matmul() -> None:
        (a @ b).float()
        sync()

    @torch.no_grad()
    def patch_network() -> None:
        extractor(batch).float()
        sync()

    @torch.no_grad()
    def rerank() -> None:
        model.match(ids, mask, patches).float()
        sync()

    def train_step() -> None:  # the arithmetic of a training step: the same pass, forward and backward
        model.zero_grad(set_to_none=True)
        model.match(ids, mask, patches).float().sum().backward()
        sync()

    return {
        f"matmul {size}x{size}": matmul,
        f"patch network, {photos} photos": patch_network,
        f"re-rank, {pairs} pairs": rerank,
        f"forward + backward, {pairs} pairs": train_step,
    }


def timed(call: Callable[[], None], device: torch.device, bf16: bool) -> float:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        start = time.perf_counter()
        call()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=1024, help="side of the square matrices")
    parser.add_argument("--photos", type=int, default=8)
    parser.add_argument(
        "--pairs", type=int, default=50, help="candidates of one query (the service's rerank_k)"
    )
    parser.add_argument("--device", default="cpu", help="auto, cpu or cuda")
    args = parser.parse_args()

    device = pick_device(args.device)
    print(f"device: {device}; torch CPU capability: {torch.backends.cpu.get_cpu_capability()}")
    if device.type == "cpu":
        sets = ("avx2", "avx512", "avx512_bf16", "amx_tile", "vnni")
        print("instruction sets: " + ", ".join(f"{name} {'yes' if cpu_has(name) else 'no'}" for name in sets))
    print(f"the project runs {precision_name(device)} here (bf16 only where native: model/precision.py)")
    print(f"\n| workload | fp32 s (median of {args.repeats}) | bf16 autocast s | bf16 speed-up |")
    print("| --- | --- | --- | --- |")
    for name, call in workloads(device, args.size, args.photos, args.pairs).items():
        for bf16 in (False, True):
            timed(call, device, bf16)  # warm-up: kernels, allocator
        samples: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for bf16 in (False, True):
                samples[bf16].append(timed(call, device, bf16))
        fp32, bf16 = statistics.median(samples[False]), statistics.median(samples[True])
        print(f"| {name} | {fp32:.3f} | {bf16:.3f} | {fp32 / bf16:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
