"""Index build throughput: patch-feature extraction apart from encode + build over cached features.

    python benchmarks/index_build.py --data hm:../shared/data/hm --data myntra:../shared/data/myntra \
        --limit 2000 [--model RUN/best | --stand-in tiny|full]

Stage 1 fills the patch-feature cache (the CNN over every uncached image) and is timed on its own.
Stage 2 is `build_bundle` over the now cached features: towers, tokens, patch codes, metadata, faiss
training and adding, writing. The issue's target (>= 200 items/s) is for stage 2.
"""

from __future__ import annotations

import argparse
import functools
import logging
import tempfile
import time
from pathlib import Path

import faiss
from index_common import machine, print_table, stand_in_checkpoint  # also puts the repo on sys.path

from index.build import build_bundle
from index.config import IndexConfig
from model.catalogue import load_catalogue
from model.feature_cache import FeatureCache, image_key
from model.inference import FashionBertInference
from model.patch_features import PatchFeatureConfig, PatchFeatureExtractor


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", action="append", default=None, help="KIND:PATH, repeatable")
    parser.add_argument("--limit", type=int, default=None, help="items per catalogue")
    parser.add_argument("--model", default=None, help="checkpoint; default: an untrained stand-in")
    parser.add_argument("--stand-in", choices=["tiny", "full"], default="full", help="stand-in model size")
    parser.add_argument("--cache", default="cache")
    parser.add_argument("--out", default=None, help="bundle folder (default: a temporary one)")
    parser.add_argument("--factory", default="auto")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--faiss-threads", type=int, default=0, help="OpenMP threads for faiss (0: its default)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.faiss_threads:
        # On a shared machine with one core free, one thread beats two fighting over it.
        faiss.omp_set_num_threads(args.faiss_threads)
    specs = args.data or ["hm:../shared/data/hm", "myntra:../shared/data/myntra"]

    with tempfile.TemporaryDirectory(prefix="index-build-bench-") as scratch:
        model_dir = (
            Path(args.model) if args.model else stand_in_checkpoint(Path(scratch) / "model", args.stand_in)
        )
        inference = FashionBertInference.from_checkpoint(model_dir, device="cpu", bf16_weights=True)
        bert = inference.config.bert
        model_name = (
            f"{model_dir.name if args.model else 'untrained ' + args.stand_in}: hidden {bert.get('hidden_size')}, "
            f"{bert.get('num_hidden_layers')} layers, embed {inference.config.embed_dim}"
        )
        extractor = PatchFeatureExtractor(PatchFeatureConfig.from_dict(inference.config.patch_features))
        cache = FeatureCache(args.cache, extractor)
        catalogues = [load_catalogue(spec, limit=args.limit) for spec in specs]

        feature_rows = []
        for catalogue in catalogues:
            cached = sum(
                cache.path(image_key(catalogue.image_bytes(item))).exists() for item in catalogue.items
            )
            started = time.perf_counter()
            kept, _ = cache.features_for(catalogue, progress=False)
            seconds = time.perf_counter() - started
            computed = len(kept) - cached
            feature_rows.append(
                {
                    "catalogue": catalogue.name,
                    "items": len(catalogue),
                    "already cached": cached,
                    "computed": computed,
                    "seconds": seconds,
                    "computed img/s": computed / seconds if computed > 0 else float("nan"),
                }
            )

        out = Path(args.out) if args.out else Path(scratch) / "bundle"
        config = IndexConfig(factory=args.factory, batch_size=args.batch_size)
        features = functools.partial(cache.features_for, progress=False)
        report = build_bundle(inference, catalogues, features, out, config, progress=False)
        from index.bundle import read_manifest

        manifest = read_manifest(out)

    print(f"machine: {machine()}; faiss threads {faiss.omp_get_max_threads()}")
    print(f"model: {model_name}")
    print_table(feature_rows, "stage 1: patch features (EfficientNet-Lite0 over uncached images)")
    stage_rows = [
        {"stage": stage, "seconds": seconds, "ms/item": 1000 * seconds / report.added}
        for stage, seconds in report.stages.items()
    ]
    stage_rows.append(
        {"stage": "total", "seconds": report.seconds, "ms/item": 1000 * report.seconds / report.added}
    )
    print_table(stage_rows, f"stage 2: encode + build over cached features ({report.added} items)")
    towers = report.stages.get("image_tower", 0.0) + report.stages.get("text_tower", 0.0)
    rest = report.seconds - towers
    print(
        f"\nfactory {manifest['indexes']['factory']}; {report.added} items in {report.seconds:.1f} s = "
        f"{report.items_per_second:.0f} items/s; without the model towers {report.added / rest:.0f} items/s; "
        f"skipped {report.skipped_unreadable} unreadable, {report.skipped_duplicate} duplicate ids"
    )


if __name__ == "__main__":
    main()
