"""Load test of the search service: QPS and latency percentiles beside retrieval quality.

Starts `fashionbert serve` as a separate process on loopback, then drives it from this process at
concurrency 1, 8 and 32 with text and image queries (validation items: the query is an item's text
or photo, a hit is that item or one with identical text), for three ways of searching:

  embeddings   rerank=false: recall only
  two-stage    recall `recall_k`, cross-encoder re-ranks the best `rerank_k` (the service's default)
  brute-force  the cross-encoder scores the whole catalogue (recall_k = rerank_k = catalogue size)

and measures this machine's matrix-multiply throughput in the same run (bf16 where the CPU or GPU
computes it natively, else fp32: what the model runs in, `model/precision.py`), to say what share of
it the re-ranker reaches. Every cell is bounded by a query count and a time limit.

    python benchmarks/serve_load.py --model runs/x/best --index bundles/hm --data hm:../shared/data/hm
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

MODES = ("embeddings", "two-stage", "brute-force")
MODALITIES = ("text", "image")
RECALL_AT = 10
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `python benchmarks/serve_load.py` from a checkout, installed or not

from reliability.service import running_service  # noqa: E402


@dataclass(frozen=True)
class Query:
    item_id: str
    text: str  # the text query (see `query_text`)
    item_text: str  # the item's whole text: what an image query's candidates are scored with
    image: bytes
    relevant: frozenset[str]  # the item and every item whose text the text query cannot tell apart
    relevant_to_image: frozenset[str]  # the item and every item with identical whole text


@dataclass
class Cell:
    mode: str
    modality: str
    concurrency: int
    latencies_ms: list[float] = field(default_factory=list)
    hits: dict[str, bool] = field(default_factory=dict)  # query item id -> relevant item in the top 10
    errors: int = 0
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.latencies_ms)
        pct = (lambda q: float(np.percentile(lat, q))) if len(lat) else (lambda q: float("nan"))
        return {
            "mode": self.mode,
            "modality": self.modality,
            "concurrency": self.concurrency,
            "requests": len(lat),
            "errors": self.errors,
            "qps": len(lat) / self.wall_s if self.wall_s else float("nan"),
            "p50_ms": pct(50),
            "p95_ms": pct(95),
            "p99_ms": pct(99),
        }


# -- the server ---------------------------------------------------------------------------------------


# Brute force asks for the whole catalogue; the benchmark's own bounds keep it in check.
SERVER_SETTINGS = {
    "max_recall_k": 100_000_000,
    "max_rerank_k": 100_000_000,
    "max_queue_depth": 1024,
    "stage_timeout_s": 3600,  # brute force over 10k items takes about a minute
    "model_call_timeout_s": 3600,  # ... in one model call
}


def scrape(base_url: str) -> dict[str, float]:
    """The unlabelled samples of /metrics, by name."""
    values: dict[str, float] = {}
    for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        match = re.match(r"^([a-z_]+) ([0-9.e+-]+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def wait_drained(base_url: str, timeout_s: float = 120.0) -> None:
    """Let abandoned requests finish so they do not slow the next cell."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and scrape(base_url).get("fashionbert_queue_depth", 0) > 0:
        time.sleep(0.2)


# -- queries ------------------------------------------------------------------------------------------


def query_text(text: str, style: str) -> str:
    """An item's text as a query: whole (`full`), or `short`, its first two sentences, what a shopper
    types: H&M's "name. Colour Type." (about 10 word pieces against 40), Myntra's title and attributes."""
    if style == "full":
        return text
    return ".".join(text.split(".")[:2]).strip() + "."


def load_queries(args: argparse.Namespace, base_url: str) -> list[Query]:
    from model.catalogue import load_catalogue

    catalogue = load_catalogue(args.data, limit=args.limit)
    _, validation = catalogue.split(val_fraction=args.val_fraction, seed=args.split_seed)
    by_text: dict[str, set[str]] = defaultdict(set)  # text -> items it cannot tell apart
    by_query: dict[str, set[str]] = defaultdict(set)
    for item in catalogue.items:
        by_text[item.text].add(item.id)
        by_query[query_text(item.text, args.text_queries)].add(item.id)
    queries = []
    with httpx.Client(base_url=base_url, timeout=10) as client:
        for item in validation.items:
            if len(queries) >= args.queries:
                break
            if client.get(f"/items/{item.id}").status_code != 200:
                continue  # not in this bundle (e.g. skipped when it was built)
            path = Path(item.image)
            if path.is_file():
                image = path.read_bytes()
            else:  # HDF5 catalogues hold pixels, not files: encode one
                buffer = io.BytesIO()
                catalogue.open_image(item).save(buffer, "PNG")
                image = buffer.getvalue()
            text = query_text(item.text, args.text_queries)
            relevant, relevant_to_image = frozenset(by_query[text]), frozenset(by_text[item.text])
            queries.append(Query(item.id, text, item.text, image, relevant, relevant_to_image))
    if not queries:
        raise SystemExit("no validation item of --data is in the bundle; check --data/--limit/--val-fraction")
    return queries


def mode_options(mode: str, catalogue_size: int, args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"k": RECALL_AT, "recall_k": args.recall_k, "rerank_k": args.rerank_k}
    if mode == "embeddings":
        options["rerank"] = False
    elif mode == "brute-force":
        options.update(recall_k=catalogue_size, rerank_k=catalogue_size)
    return options


# -- load ---------------------------------------------------------------------------------------------


async def run_cell(
    base_url: str,
    cell: Cell,
    queries: Sequence[Query],
    options: dict[str, Any],
    max_requests: int,
    max_s: float,
) -> None:
    """`cell.concurrency` clients issue queries back to back until `max_requests` or `max_s` is reached."""
    next_query = 0
    deadline = time.perf_counter() + max_s
    limits = httpx.Limits(max_connections=cell.concurrency, max_keepalive_connections=cell.concurrency)

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal next_query
        while next_query < max_requests and time.perf_counter() < deadline:
            query = queries[next_query % len(queries)]
            next_query += 1
            start = time.perf_counter()
            if cell.modality == "text":
                response = await client.post("/search/text", json={"query": query.text, **options})
            else:
                form = {key: str(value).lower() for key, value in options.items()}
                response = await client.post(
                    "/search/image", files={"file": ("q.jpg", query.image)}, data=form
                )
            elapsed = 1000 * (time.perf_counter() - start)
            if response.status_code != 200:
                cell.errors += 1
                continue
            cell.latencies_ms.append(elapsed)
            ids = [result["id"] for result in response.json()["results"][:RECALL_AT]]
            relevant = query.relevant if cell.modality == "text" else query.relevant_to_image
            cell.hits[query.item_id] = any(i in relevant for i in ids)

    async with httpx.AsyncClient(base_url=base_url, timeout=None, limits=limits) as client:
        start = time.perf_counter()
        workers = [asyncio.create_task(client_loop(client)) for _ in range(cell.concurrency)]
        # Past the time limit, requests still running are abandoned, not awaited.
        done, pending = await asyncio.wait(workers, timeout=max_s + 1.0)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        cell.wall_s = time.perf_counter() - start


# -- compute ceiling ----------------------------------------------------------------------------------


def ceiling_dtype() -> str:
    """The dtype the model's matrix work runs in on this machine: bf16 where native, else fp32."""
    from model.inference import pick_device
    from model.precision import precision_name

    return precision_name(pick_device("auto"))


def matmul_tflops(size: int = 2048, seconds: float = 3.0) -> float:
    """This machine's matrix-multiply throughput (torch, all its threads) in `ceiling_dtype()`, as the
    re-ranker's ceiling."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if ceiling_dtype() == "bf16" else torch.float32
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    for _ in range(3):
        a @ b  # noqa: B018 - warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b  # noqa: B018
        count += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e12


def flops_per_pair(model_dir: str, text_tokens: float) -> float:
    """Forward FLOPs of re-ranking one (text, image) pair (matmuls only): the layers from the fusion layer up
    over text and pooled patches, all the re-rank computes (its tower term is the recall score; below a
    fusion layer the bundle stores the candidates' states), plus, without one, each candidate's patch
    projection."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    bert = config["bert"]
    hidden, layers = bert["hidden_size"], bert["num_hidden_layers"]
    intermediate = bert.get("intermediate_size", 4 * hidden)
    patches = config["num_patches"] // config.get("patch_pool", 1) ** 2
    tokens = text_tokens + patches
    per_layer = tokens * (8 * hidden**2 + 4 * hidden * intermediate) + 4 * tokens**2 * hidden
    fusion_layer = config.get("fusion_layer", 0)
    projection = 2 * patches * config["patch_feature_dim"] * hidden if fusion_layer == 0 else 0
    return (layers - fusion_layer) * per_layer + projection


def mean_tokens(model_dir: str, texts: Sequence[str]) -> float:
    from transformers import AutoTokenizer

    config = json.loads((Path(model_dir) / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(list(texts), truncation=True, max_length=config["max_text_len"])["input_ids"]
    return float(np.mean([len(x) for x in ids]))


# -- report -------------------------------------------------------------------------------------------


def recall_at_10(cells: Sequence[Cell], mode: str, modality: str, only: set[str] | None = None) -> float:
    hits: dict[str, bool] = {}
    for cell in cells:
        if (cell.mode, cell.modality) == (mode, modality):
            hits.update(cell.hits)
    values = [hit for item_id, hit in hits.items() if only is None or item_id in only]
    return float(np.mean(values)) if values else float("nan")


def answered(cells: Sequence[Cell], mode: str, modality: str) -> set[str]:
    return {i for c in cells if (c.mode, c.modality) == (mode, modality) for i in c.hits}


def report(cells: list[Cell], extra: dict[str, Any]) -> dict[str, Any]:
    rows = [cell.summary() for cell in cells]
    for row in rows:
        row["R@10"] = recall_at_10(cells, row["mode"], row["modality"])
    comparisons = {}
    for modality in MODALITIES:
        shared = answered(cells, "two-stage", modality) & answered(cells, "brute-force", modality)
        p50 = {
            row["mode"]: row["p50_ms"]
            for row in rows
            if row["modality"] == modality and row["concurrency"] == 1
        }
        qps: dict[str, float] = {}  # each mode's best throughput over the concurrencies it ran at
        for row in rows:
            if row["modality"] == modality:
                qps[row["mode"]] = max(qps.get(row["mode"], 0.0), row["qps"])
        two, brute = (recall_at_10(cells, m, modality, shared) for m in ("two-stage", "brute-force"))
        # Re-ranking's gain, on the queries both two-stage and embeddings-only answered.
        same = answered(cells, "two-stage", modality) & answered(cells, "embeddings", modality)
        reranked, recalled = (recall_at_10(cells, m, modality, same) for m in ("two-stage", "embeddings"))
        comparisons[modality] = {
            "rerank_shared_queries": len(same),
            "rerank_R@10": reranked,
            "embeddings_R@10": recalled,
            "shared_queries": len(shared),
            "two_stage_R@10": two,
            "brute_force_R@10": brute,
            "quality_ratio": two / brute if brute else float("nan"),
            "speedup_p50_c1": p50.get("brute-force", float("nan")) / p50.get("two-stage", float("nan")),
            "speedup_best_qps": qps.get("two-stage", float("nan")) / qps.get("brute-force", float("nan")),
        }
    return {"cells": rows, "comparisons": comparisons, **extra}


def print_report(result: dict[str, Any]) -> None:
    ceiling = f"{result['matmul_dtype']} matmul ceiling"
    print(f"\n{ceiling}: {result['matmul_tflops']:.3f} TFLOP/s ({result['device']})")
    print(f"catalogue: {result['catalogue_size']} items, {result['queries']} validation queries\n")
    print("| search | mode | conc. | requests | QPS | p50 ms | p95 ms | p99 ms | R@10 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in result["cells"]:
        cells = [row["modality"], row["mode"], row["concurrency"], row["requests"], f"{row['qps']:.1f}"]
        cells += [f"{row[p]:.1f}" for p in ("p50_ms", "p95_ms", "p99_ms")] + [f"{row['R@10']:.3f}"]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print()
    for modality, c in result["comparisons"].items():
        if c["rerank_shared_queries"]:  # both modes ran
            print(
                f"{modality}: two-stage vs embeddings only on {c['rerank_shared_queries']} shared queries: "
                f"R@10 {c['rerank_R@10']:.3f} vs {c['embeddings_R@10']:.3f}"
            )
        if not c["shared_queries"]:  # brute force did not run
            continue
        print(
            f"{modality}: two-stage vs brute force on {c['shared_queries']} shared queries: "
            f"R@10 {c['two_stage_R@10']:.3f} vs {c['brute_force_R@10']:.3f} "
            f"(ratio {c['quality_ratio']:.2f}); {c['speedup_p50_c1']:.1f}x faster at p50 c=1, "
            f"{c['speedup_best_qps']:.1f}x the best QPS"
        )
    for name, r in result["rerank_efficiency"].items():
        print(
            f"re-rank compute ({name}): {r['pairs_per_s']:.0f} pairs/s while computing, "
            f"~{r['tflops']:.3f} TFLOP/s = {100 * r['share_of_matmul']:.0f}% of the {ceiling}"
        )


# -- main ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--index", required=True, help="bundle folder built for that checkpoint")
    parser.add_argument("--data", required=True, help="the catalogue the bundle was built from, KIND:PATH")
    parser.add_argument("--limit", type=int, default=None, help="the --limit the bundle was built with")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--queries", type=int, default=200, help="validation items used as queries")
    parser.add_argument(
        "--text-queries",
        choices=("full", "short"),
        default="full",
        help="text queries: the item's whole text, or its first two sentences (name, colour, type)",
    )
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--recall-k", type=int, default=200)
    parser.add_argument("--rerank-k", type=int, default=50)
    parser.add_argument("--max-requests", type=int, default=200, help="requests per cell at most")
    parser.add_argument("--cell-seconds", type=float, default=20.0, help="seconds per cell at most")
    parser.add_argument("--brute-force-requests", type=int, default=40, help="brute-force requests per cell")
    parser.add_argument(
        "--brute-force-seconds",
        type=float,
        default=None,
        help="seconds per brute-force cell (default --cell-seconds; a 10k catalogue takes about a minute a query)",
    )
    parser.add_argument(
        "--brute-force-concurrency", default=None, help="brute-force concurrencies (default --concurrency)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--int8-matching", action="store_true", help="re-rank with the int8 encoder copy")
    parser.add_argument("--ready-timeout", type=float, default=600.0)
    parser.add_argument("--server-log", default="serve_load.server.log")
    parser.add_argument("--out", default=None, help="write the full report as JSON here")
    args = parser.parse_args(argv)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    brute_concurrencies = [int(c) for c in (args.brute_force_concurrency or args.concurrency).split(",")]
    modes = [m for m in args.modes.split(",") if m]
    assert set(modes) <= set(MODES), f"modes must be among {MODES}"

    settings = {**SERVER_SETTINGS, "device": args.device, "int8_matching": args.int8_matching}
    with running_service(
        Path(args.model),
        Path(args.index),
        Path(args.server_log),
        settings,
        ready_timeout_s=args.ready_timeout,
    ) as service:
        base_url = service.base_url
        ready = service.wait_ready()
        size = ready["index"]["items"]
        queries = load_queries(args, base_url)
        tflops = matmul_tflops()  # the server is idle now: the ceiling is measured on the same cores
        print(f"server ready ({ready['model']['device']}), {size} items; {len(queries)} queries", flush=True)

        cells: list[Cell] = []
        efficiency_samples: dict[str, tuple[float, float]] = {}
        for mode in modes:
            options = mode_options(mode, size, args)
            brute = mode == "brute-force"
            limit = args.brute_force_requests if brute else args.max_requests
            seconds = (args.brute_force_seconds or args.cell_seconds) if brute else args.cell_seconds
            for modality in MODALITIES:
                for concurrency in brute_concurrencies if brute else concurrencies:
                    cell = Cell(mode, modality, concurrency)
                    before = scrape(base_url)
                    asyncio.run(run_cell(base_url, cell, queries, options, limit, seconds))
                    after = scrape(base_url)
                    pairs = after["fashionbert_rerank_pairs_total"] - before["fashionbert_rerank_pairs_total"]
                    busy = (
                        after["fashionbert_rerank_compute_seconds_total"]
                        - before["fashionbert_rerank_compute_seconds_total"]
                    )
                    if mode != "embeddings" and busy > 0:
                        efficiency_samples[f"{mode} {modality} c={concurrency}"] = (pairs, busy)
                    cells.append(cell)
                    print(json.dumps(cell.summary()), flush=True)
                    wait_drained(base_url)

    # A text query pairs its own text with every candidate; an image query, every candidate's text.
    pair_tokens = {
        "text": mean_tokens(args.model, [q.text for q in queries]),
        "image": mean_tokens(args.model, [q.item_text for q in queries]),
    }
    efficiency = {}
    for name, (pairs, busy) in efficiency_samples.items():
        modality = name.split()[1]
        achieved = pairs * flops_per_pair(args.model, pair_tokens[modality]) / busy / 1e12
        efficiency[name] = {
            "pairs_per_s": pairs / busy,
            "tflops": achieved,
            "share_of_matmul": achieved / tflops,
        }
    result = report(
        cells,
        {
            "matmul_tflops": tflops,
            "matmul_dtype": ceiling_dtype(),
            "device": ready["model"]["device"],
            "catalogue_size": size,
            "queries": len(queries),
            "rerank_k": args.rerank_k,
            "recall_k": args.recall_k,
            "rerank_efficiency": efficiency,
            "args": {k: v for k, v in vars(args).items()},
        },
    )
    print_report(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
