"""Training throughput (pairs/s) of one FashionBERT step, bf16 autocast vs fp32, on this machine (its GPU
if it has one; `--device cpu` for the CPU). Where the device has no native bf16 both run fp32
(`model/precision.py`; `benchmarks/precision_speed.py` measures what emulated bf16 would cost).

    python benchmarks/train_speed.py --batch-size 32 --steps 3 --repeats 3
    python benchmarks/train_speed.py --precisions bf16 --mine-top-k 30 --negatives-per-item 3   # mined
    python benchmarks/train_speed.py --precisions bf16 --fixed-weights   # the adaptive loss's cost, by difference
    python benchmarks/train_speed.py --precisions bf16 --adaptive-scope last_layer   # the wider scope of before

Synthetic patch features and H&M-length texts, so only the model's arithmetic is measured. Prints the
median seconds per step and pairs/s of each precision and their ratio, measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from model.catalogue import Catalogue, Item
from model.config import TINY_BERT, FashionBertConfig
from model.data import grouped_batches, prepare_data
from model.precision import native_bf16
from model.training import TrainConfig, Trainer, build_model

TEXT = "Fitted midi skirt. Black Skirt. Fitted midi skirt in satin with a concealed zip and a slit at the back. Lined."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--steps", type=int, default=3, help="timed steps per repeat (after one warm-up step)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a tiny random BERT instead of MiniLM")
    parser.add_argument("--precisions", default="bf16,fp32", help="comma list of bf16, fp32")
    parser.add_argument("--mine-top-k", type=int, default=0, help="false pairs from mined neighbours")
    parser.add_argument("--negatives-per-item", type=int, default=1)
    parser.add_argument(
        "--fixed-weights", action="store_true", help="equal fixed task weights: no per-task gradients"
    )
    parser.add_argument("--adaptive-scope", default="last_output", help="last_output, last_layer or encoder")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--text-model", default=None, help="pretrained BERT folder (default: the config's)")
    args = parser.parse_args()

    n = args.batch_size * 4
    items = [
        Item(
            id=str(i),
            text=f"{TEXT} Style {i}.",
            title="",
            image="",
            category=f"c{i % 3}",
            subcategory=f"s{i % 8}",
            group=str(i),
        )
        for i in range(n)
    ]
    rng = np.random.default_rng(0)
    results = {}
    for precision in args.precisions.split(","):
        torch.manual_seed(0)
        config = FashionBertConfig()
        if args.text_model:
            config.text_model = args.text_model
        if args.tiny:
            config.bert = dict(TINY_BERT)
        model, tokenizer = build_model(config, pretrained=not args.tiny)
        features = rng.standard_normal((n, config.num_patches, config.patch_feature_dim)).astype(np.float16)
        data = prepare_data(Catalogue("bench", "bench", items), features, tokenizer, config.max_text_len)
        trainer = Trainer(
            model,
            tokenizer,
            data,
            None,
            TrainConfig(
                batch_size=args.batch_size,
                device=args.device,
                bf16=precision == "bf16",
                mine_top_k=args.mine_top_k,
                mine_every=10**9,  # mined once, in the warm-up step
                negatives_per_item=args.negatives_per_item,
                adaptive=not args.fixed_weights,
                adaptive_scope=args.adaptive_scope,
            ),
            "/tmp/train-speed",
        )
        import random

        batches = list(grouped_batches(data, args.batch_size, 4, random.Random(0)))
        trainer.train_step(batches[0])  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for step in range(args.steps):
                trainer.train_step(batches[(step + 1) % len(batches)])
            times.append((time.perf_counter() - start) / args.steps)
        results[precision] = statistics.median(times)
    print(f"device: {trainer.device}, native bf16: {native_bf16(trainer.device.type)}")
    if not native_bf16(trainer.device.type):
        print("(no native bf16 here, so the bf16 setting runs fp32: model/precision.py)")
    print(f"| precision | s/step (median of {args.repeats}) | pairs/s |")
    print("| --- | --- | --- |")
    for precision, seconds in results.items():
        print(f"| {precision} | {seconds:.2f} | {args.batch_size / seconds:.1f} |")
    if {"bf16", "fp32"} <= results.keys():
        print(f"bf16 speed-up over fp32: {results['fp32'] / results['bf16']:.2f}x")


if __name__ == "__main__":
    main()
