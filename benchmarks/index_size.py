"""Bundle size per item, part by part, and what compressing the re-rank inputs costs the re-ranker.

    python benchmarks/index_size.py --limit 3000 [--model RUN/best] [--factory auto] [--exact-below 0]

Re-rank quality: for each query item, its text against its own image and the best other recall
candidates, scored by the cross-encoder twice: on full-precision patch features (the cache) and on the
bundle's decoded codes. For a model with a fusion layer the bundle stores side states instead, so both
directions are scored: the text against candidate images' patch states, and the image against candidate
texts' states, each from the model (full precision) and from the bundle's decoded state codes. Without
--model an untrained tiny model stands in: sizes are real, but its re-rank R@1 is chance and only the
agreement between the two scorings says anything.
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
from index.bundle import STATE_FILES, Bundle
from index.codec import relative_error
from index.config import IndexConfig
from model.catalogue import load_catalogue
from model.feature_cache import FeatureCache
from model.inference import FashionBertInference
from model.pair_states import PairStates
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
    # Models with a fusion layer only.
    "text_states.npy": "re-rank text states",
    "image_states.npy": "re-rank patch states",
    "text_states_codec.faiss": "text states codec (fixed)",
    "image_states_codec.faiss": "patch states codec (fixed)",
}
FIXED = ("patch_codec.faiss", "manifest.json", "text_states_codec.faiss", "image_states_codec.faiss")


def agreement(full: np.ndarray, compressed: np.ndarray) -> dict[str, float]:
    """(queries, candidates) logits, the true item first: R@1 both ways and how closely they agree."""
    ranks = lambda logits: np.argsort(np.argsort(-logits, axis=1), axis=1)  # noqa: E731
    spearman = np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(ranks(full), ranks(compressed), strict=True)])
    return {
        "R@1 full": float((full.argmax(1) == 0).mean()),
        "R@1 codes": float((compressed.argmax(1) == 0).mean()),
        "same top-1": float(np.mean(full.argmax(1) == compressed.argmax(1))),
        "rank correlation": float(spearman),
        "mean |logit diff|": float(np.abs(full - compressed).mean()),
        "logit std": float(full.std()),
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
    parser.add_argument(
        "--states-codec", default=IndexConfig().states_codec, help='fused models; "" = float16'
    )
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
        config = IndexConfig(
            factory=args.factory,
            exact_below=args.exact_below,
            patch_codec=args.patch_codec,
            states_codec=args.states_codec,
        )
        features_for = functools.partial(cache.features_for, progress=False)
        out = Path(scratch) / "bundle"
        build_bundle(inference, catalogues, features_for, out, config, progress=False)

        with Bundle.open(out) as bundle:
            rows_total = bundle.rows
            sizes = {name: (out / name).stat().st_size for name in PARTS if (out / name).exists()}
            manifest = bundle.manifest
            # Re-rank inputs: full precision from the cache (and the model), compressed from the bundle.
            rng = np.random.default_rng(0)
            query_rows = rng.choice(rows_total, min(args.queries, rows_total), replace=False)
            all_items = [item for catalogue in catalogues for item in catalogue.items]
            by_id = {item.id: item for item in all_items}
            pool = inference.config.patch_pool

            def full_patches(rows: np.ndarray) -> np.ndarray:
                """The grids the bundle stores, from the float16 cache: (n, N, D) float32."""
                ids = [item["id"] for item in bundle.items(rows)]
                _, features = features_for(catalogues[0].subset([by_id[i] for i in ids]))
                return pool_grid(features, pool).astype(np.float32)

            def with_true_first(row: int, recalled: np.ndarray) -> np.ndarray:
                return np.array([row, *[r for r in recalled if r != row and r >= 0][: args.candidates - 1]])

            texts = [item["text"] for item in bundle.items(query_rows)]
            text_embeddings = inference.encode_texts(texts)
            _, recalled = bundle.search_images(text_embeddings, args.candidates)
            image_queries = full_patches(query_rows)
            image_embeddings = inference.encode_images(image_queries)
            _, recalled_texts = bundle.search_texts(image_embeddings, args.candidates)
            logits: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
            errors = []

            def record(direction: str, full: np.ndarray, compressed: np.ndarray) -> None:
                """One query's logits from full-precision and from compressed re-rank inputs."""
                sides = logits.setdefault(direction, ([], []))
                sides[0].append(full)
                sides[1].append(compressed)

            def error(full: np.ndarray, compressed: np.ndarray) -> float:
                full, compressed = full.astype(np.float32), compressed.astype(np.float32)
                return float(((full - compressed) ** 2).sum() / (full**2).sum())

            for q, row in enumerate(query_rows):
                candidates = with_true_first(row, recalled[q])
                full = full_patches(candidates)
                tokens = inference.tokenize([texts[q]]) * len(candidates)
                if not bundle.stores_states:  # the encoder reads patch features: the codes' error
                    compressed = bundle.patch_features(candidates)
                    record(
                        "text -> images", inference.match(tokens, full), inference.match(tokens, compressed)
                    )
                    errors.append(error(full, compressed))
                    continue
                # A fused model: candidates' states from the model against the bundle's decoded codes,
                # the logit's tower term the pair's tower cosine in both.
                text, mask = inference.text_states(tokens[:1])
                text, mask = (np.repeat(a, len(candidates), axis=0) for a in (text, mask))
                similarity = (inference.encode_images(full) @ text_embeddings[q]).astype(np.float32)
                exact = inference.image_states(full)
                coded = bundle.image_states(candidates)
                errors.append(error(exact, coded))
                record(
                    "text -> images",
                    *(
                        inference.score_states(PairStates(text, mask, image, similarity))
                        for image in (exact, coded)
                    ),
                )
                # The image query against candidate texts' states.
                candidates = with_true_first(row, recalled_texts[q])
                token_ids = bundle.token_ids(candidates)
                image = np.repeat(inference.image_states(image_queries[q : q + 1]), len(candidates), axis=0)
                similarity = (inference.encode_token_ids(token_ids) @ image_embeddings[q]).astype(np.float32)
                exact_text, exact_mask = inference.text_states(token_ids)
                coded_text, coded_mask = bundle.text_states(candidates)
                assert (exact_mask == coded_mask).all()
                record(
                    "image -> texts",
                    *(
                        inference.score_states(PairStates(t, exact_mask, image, similarity))
                        for t in (exact_text, coded_text)
                    ),
                )
            if not bundle.stores_states:
                one_item = features_for(catalogues[0].subset([all_items[0]]))[1]
                codec_error = relative_error(bundle.codec, pool_grid(one_item, pool))

    print(f"machine: {machine()}")
    codes = (
        f"patch codec {manifest['patch_codec']['factory']}"
        if "patch_codec" in manifest
        else f"states codec {manifest['states'].get('codecs', {}).get(STATE_FILES[0], {}).get('factory', 'none')}"
    )
    print(
        f"bundle: {rows_total:,} items from {', '.join(specs)}; factory {manifest['indexes']['factory']}, "
        f"embed_dim {manifest['model']['embed_dim']}, {codes}"
    )
    total = sum(sizes.values())
    table = [
        {"part": PARTS[name], "file": name, "bytes": size, "bytes/item": size / rows_total}
        for name, size in sorted(sizes.items(), key=lambda kv: -kv[1])
    ]
    table.append({"part": "total", "file": "", "bytes": total, "bytes/item": total / rows_total})
    fixed = sum(sizes.get(name, 0) for name in FIXED)
    table.append(
        {
            "part": "total without fixed parts",
            "file": "",
            "bytes": total - fixed,
            "bytes/item": (total - fixed) / rows_total,
        }
    )
    print_table(table, "bundle size")
    if "patch_codec" in manifest:
        raw = inference.config.num_patches * inference.config.patch_feature_dim * 2
        coded = manifest["patch_codec"]["bytes_per_item"]
        print(f"patch features raw float16: {raw:,} bytes/item -> {coded:,} in codes ({raw / coded:.0f}x)")

    compressed_inputs = (
        f"decoded {manifest['states']['codecs'][STATE_FILES[0]]['factory']} state codes"
        if "codecs" in manifest.get("states", {})
        else "float16 states"
        if bundle.stores_states
        else f"decoded {manifest['patch_codec']['factory']} patch codes"
    )
    table = [
        {"direction": direction, **agreement(np.stack(full), np.stack(coded))}
        for direction, (full, coded) in logits.items()
    ]
    print_table(
        table,
        f"re-rank over {args.candidates} candidates (the true item and the best other recall candidates), "
        f"{len(query_rows)} queries, full precision vs {compressed_inputs} (chance R@1 {1 / args.candidates:.3f})",
    )
    what = "state" if bundle.stores_states else "patch"
    print(f"\n{what} relative squared error (text -> images candidates): {np.mean(errors):.4f}", end="")
    print(f" (one item {codec_error:.4f})" if not bundle.stores_states else "")
    if not args.model:
        print(
            "note: untrained stand-in model: R@1 is chance-level and says nothing about the codec; "
            "rerun with --model RUN/best for the quality comparison"
        )


if __name__ == "__main__":
    main()
