"""Bundle size per item, part by part, and what compressing the re-rank patch features costs the re-ranker.

    python benchmarks/index_size.py --limit 3000 [--model RUN/best] [--factory auto] [--exact-below 0]

Re-rank quality: for each query item, its text against its own image and the best other recall
candidates, scored by the cross-encoder twice: on full-precision patch features (the cache) and on the
bundle's decoded codes. Without --model an untrained tiny model stands in: sizes are real, but its
re-rank R@1 is chance and only the agreement between the two scorings says anything.
"""

from __future__ import annotations

import argparse
import functools
import logging
import tempfile
from pathlib import Path

import numpy as np
from index_common import machine, print_table, stand_in_checkpoint  # also puts the repo on sys.path

from index.build import build_bundle
from index.bundle import Bundle
from index.codec import relative_error
from index.config import IndexConfig
from model.catalogue import load_catalogue
from model.feature_cache import FeatureCache
from model.inference import FashionBertInference
from model.patch_features import PatchFeatureConfig, PatchFeatureExtractor
from model.patches import pool_grid

PARTS = {
    "patch_codes.npy": "re-rank patch codes",
    "items.sqlite": "metadata (SQLite)",
    "image.faiss": "image recall index",
    "text.faiss": "text recall index",
    "token_ids.npy": "re-rank token ids",
    "token_lengths.npy": "token lengths",
    "patch_codec.faiss": "patch codec (fixed)",
    "manifest.json": "manifest (fixed)",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="trained checkpoint (default: untrained tiny stand-in)")
    parser.add_argument("--data", action="append", default=None)
    parser.add_argument("--limit", type=int, default=3000)
    parser.add_argument("--cache", default="cache")
    parser.add_argument("--factory", default="auto")
    parser.add_argument("--exact-below", type=int, default=IndexConfig().exact_below)
    parser.add_argument("--patch-codec", default=IndexConfig().patch_codec)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument(
        "--candidates", type=int, default=20, help="re-ranked per query, the true item included"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    specs = args.data or ["hm:../shared/data/hm"]

    with tempfile.TemporaryDirectory(prefix="index-size-bench-") as scratch:
        model_dir = Path(args.model) if args.model else stand_in_checkpoint(Path(scratch) / "model", "tiny")
        inference = FashionBertInference.from_checkpoint(model_dir, device="cpu")
        cache = FeatureCache(
            args.cache, PatchFeatureExtractor(PatchFeatureConfig.from_dict(inference.config.patch_features))
        )
        catalogues = [load_catalogue(spec, limit=args.limit) for spec in specs]
        config = IndexConfig(factory=args.factory, exact_below=args.exact_below, patch_codec=args.patch_codec)
        features_for = functools.partial(cache.features_for, progress=False)
        out = Path(scratch) / "bundle"
        build_bundle(inference, catalogues, features_for, out, config, progress=False)

        with Bundle.open(out) as bundle:
            rows_total = bundle.rows
            sizes = {name: (out / name).stat().st_size for name in PARTS}
            manifest = bundle.manifest
            # Re-rank inputs: full precision from the cache, compressed from the bundle, same rows.
            rng = np.random.default_rng(0)
            query_rows = rng.choice(rows_total, min(args.queries, rows_total), replace=False)
            items = bundle.items(query_rows)
            texts = [item["text"] for item in items]
            text_embeddings = inference.encode_texts(texts)
            _, recalled = bundle.search_images(text_embeddings, args.candidates)
            all_items = [item for catalogue in catalogues for item in catalogue.items]
            by_id = {item.id: item for item in all_items}
            full_logits, compressed_logits, errors = [], [], []
            for q, row in enumerate(query_rows):
                others = [r for r in recalled[q] if r != row and r >= 0][: args.candidates - 1]
                candidates = np.array([row, *others])
                ids = [item["id"] for item in bundle.items(candidates)]
                source = catalogues[0].subset([by_id[i] for i in ids])
                _, full = features_for(source)
                full = pool_grid(full, inference.config.patch_pool).astype(np.float32)  # the grid stored
                compressed = bundle.patch_features(candidates)
                tokens = inference.tokenize([texts[q]]) * len(candidates)
                full_logits.append(inference.match(tokens, full))
                compressed_logits.append(inference.match(tokens, compressed))
                errors.append(float(((full - compressed) ** 2).sum() / (full**2).sum()))
            one_item = features_for(catalogues[0].subset([all_items[0]]))[1]
            codec_error = relative_error(bundle.codec, pool_grid(one_item, inference.config.patch_pool))

    print(f"machine: {machine()}")
    print(
        f"bundle: {rows_total:,} items from {', '.join(specs)}; factory {manifest['indexes']['factory']}, "
        f"embed_dim {manifest['model']['embed_dim']}, patch codec {manifest['patch_codec']['factory']}"
    )
    total = sum(sizes.values())
    table = [
        {"part": PARTS[name], "file": name, "bytes": size, "bytes/item": size / rows_total}
        for name, size in sorted(sizes.items(), key=lambda kv: -kv[1])
    ]
    table.append({"part": "total", "file": "", "bytes": total, "bytes/item": total / rows_total})
    fixed = sizes["patch_codec.faiss"] + sizes["manifest.json"]
    table.append(
        {
            "part": "total without fixed parts",
            "file": "",
            "bytes": total - fixed,
            "bytes/item": (total - fixed) / rows_total,
        }
    )
    print_table(table, "bundle size")
    raw = inference.config.num_patches * inference.config.patch_feature_dim * 2
    print(
        f"patch features raw float16: {raw:,} bytes/item -> {manifest['patch_codec']['bytes_per_item']:,} in codes ({raw / manifest['patch_codec']['bytes_per_item']:.0f}x)"
    )

    full = np.stack(full_logits)
    compressed = np.stack(compressed_logits)
    ranks = lambda logits: np.argsort(np.argsort(-logits, axis=1), axis=1)  # noqa: E731
    spearman = np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(ranks(full), ranks(compressed), strict=True)])
    quality = [
        {
            "patch features": "full precision (float16 cache)",
            "R@1": float((full.argmax(1) == 0).mean()),
            "": "",
        },
        {
            "patch features": f"decoded {manifest['patch_codec']['factory']} codes",
            "R@1": float((compressed.argmax(1) == 0).mean()),
            "": "",
        },
    ]
    print_table(
        quality,
        f"re-rank R@1 over {full.shape[1]} candidates, {full.shape[0]} text queries (chance {1 / full.shape[1]:.3f})",
    )
    print(
        f"\nagreement: same top-1 {np.mean(full.argmax(1) == compressed.argmax(1)):.3f}, rank correlation "
        f"{spearman:.3f}, mean |logit difference| {np.abs(full - compressed).mean():.4f} "
        f"(logit std {full.std():.4f}); patch relative squared error {np.mean(errors):.4f} (one item {codec_error:.4f})"
    )
    if not args.model:
        print(
            "note: untrained stand-in model: R@1 is chance-level and says nothing about the codec; "
            "rerun with --model RUN/best for the quality comparison"
        )


if __name__ == "__main__":
    main()
