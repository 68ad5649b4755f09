"""`fashionbert up`: from a fresh checkout to a serving search service in one command.

Each step is skipped when what it makes is already there, so the second run starts serving at once:
1. data: `--data`, else `../shared/data/hm` when that folder exists, else a generated catalogue
   (`model/synthetic.py`) written once into the state folder;
2. model: `<state>/model/best`, trained for a few minutes (bf16 where native) when missing, then
   `<state>/model/fitted`: its image tower refitted to the locked text tower as an ensemble
   (`fit-image-tower`, benchmarks/RESULTS.md "Image tower ensemble");
3. index bundle: `<state>/bundles/<key>`, built when missing for this data, limit and model;
4. serve the API and the demo page.
The steps run the `fashionbert` subcommands themselves (`train`, `fit-image-tower`, `index build`,
`serve`), so `up` does nothing those commands would not do by hand.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_HM = Path("..") / "shared" / "data" / "hm"
GENERATED = "synthetic"  # `--data synthetic`: the generated catalogue even where the shared data exists
DEFAULT_ITEMS = 2000  # items read (and generated): enough to search, few enough to train on in minutes

# Runs one `fashionbert` subcommand given as its argument list; returns the exit status.
Runner = Callable[[Sequence[str]], int]


@dataclass
class UpConfig:
    state_dir: Path = Path(".fashionbert")  # model, bundles, feature cache and generated catalogue
    data: str | None = None  # KIND:PATH or "synthetic"; None = the shared H&M sample, else generated
    limit: int | None = DEFAULT_ITEMS  # None = every item
    budget_minutes: float = 5.0  # training wall-clock budget when no model is there yet
    tiny: bool = False  # tiny random BERT instead of MiniLM (smoke tests)
    # MiniLM's 6 layers read text and image apart below the last (the served default: one joint layer,
    # a sixth of the re-rank work); the tiny BERT's 2 layers stay all joint.
    fusion_layer: int = 5
    batch_size: int = 32
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    serve: bool = True  # False: prepare model and bundle, print where they are, and stop

    @property
    def model_run(self) -> Path:
        return self.state_dir / "model"

    @property
    def cache(self) -> Path:
        return self.state_dir / "cache"


class UpError(RuntimeError):
    """A step failed; the message says which and how to retry."""


def default_data(search_from: Sequence[Path] | None = None) -> str | None:
    """`hm:<path>` of the shared H&M sample beside the working folder or the repository, if there."""
    for base in search_from if search_from is not None else (Path.cwd(), REPO_ROOT):
        folder = (base / SHARED_HM).resolve()
        if (folder / "articles.csv").is_file():
            return f"hm:{folder}"
    return None


def choose_data(config: UpConfig) -> str:
    """The catalogue spec to use: the given one, the shared H&M sample, or a generated catalogue."""
    if config.data and config.data != GENERATED:
        return config.data
    shared = default_data() if config.data is None else None
    if shared is not None:
        logger.info("data: the shared H&M sample (%s)", shared)
        return shared
    from model.synthetic import SyntheticConfig, write_catalogue

    items = config.limit or DEFAULT_ITEMS
    logger.info("data: generating a catalogue of %d garments (model/synthetic.py)", items)
    path = write_catalogue(config.state_dir / "synthetic", SyntheticConfig(items=items))
    return f"jsonl:{path.resolve()}"


def _limit_args(config: UpConfig) -> list[str]:
    return [] if config.limit is None else ["--limit", str(config.limit)]


def ensure_model(config: UpConfig, spec: str, run: Runner) -> Path:
    """`<state>/model/fitted`, made first when missing: `best` trained, then its image towers refitted."""
    fitted = config.model_run / "fitted"
    if (fitted / "model.safetensors").is_file():
        logger.info("model: %s (delete %s to train again)", fitted, config.model_run)
        return fitted
    best = ensure_trained(config, spec, run)
    logger.info("model: fitting the image towers of %s into %s", best, fitted)
    argv = ["fit-image-tower", "--model", str(best), "--data", spec, *_limit_args(config)]
    argv += ["--cache", str(config.cache), "--out", str(fitted)]
    if run(argv) != 0 or not (fitted / "model.safetensors").is_file():
        raise UpError(f"fitting the image towers did not produce {fitted}; see the log above")
    return fitted


def ensure_trained(config: UpConfig, spec: str, run: Runner) -> Path:
    """`<state>/model/best`, trained first when missing."""
    best = config.model_run / "best"
    if (best / "model.safetensors").is_file():
        logger.info("model: trained %s", best)
        return best
    logger.info(
        "model: none yet; training for up to %g minutes into %s", config.budget_minutes, config.model_run
    )
    argv = [
        "train",
        "--data",
        spec,
        *_limit_args(config),
        "--cache",
        str(config.cache),
        "--out",
        str(config.model_run),
        "--budget-minutes",
        str(config.budget_minutes),
        "--batch-size",
        str(config.batch_size),
        "--validate-every",
        "100",
        "--device",
        config.device,
        *(["--tiny"] if config.tiny else ["--fusion-layer", str(config.fusion_layer)]),
    ]
    if config.model_run.exists() and (config.model_run / "last").is_dir():
        argv.append("--resume")  # an interrupted run goes on rather than starting over
    if run(argv) != 0 or not (best / "model.safetensors").is_file():
        raise UpError(f"training did not produce {best}; see the log above, then run `fashionbert up` again")
    return best


def bundle_key(spec: str, limit: int | None, model: Path) -> str:
    """Names the bundle of one catalogue, limit and model: a new model or other data gets a new bundle."""
    weights = (model / "model.safetensors").stat()
    kind, _, path = spec.partition(":")
    source = f"{kind}:{Path(path).expanduser().resolve()}"
    identity = f"{source}\x1f{limit}\x1f{model.resolve()}\x1f{weights.st_size}\x1f{weights.st_mtime_ns}"
    return hashlib.sha256(identity.encode()).hexdigest()[:12]


def ensure_bundle(config: UpConfig, spec: str, model: Path, run: Runner) -> Path:
    """`<state>/bundles/<key>`, built first when missing."""
    bundle = config.state_dir / "bundles" / bundle_key(spec, config.limit, model)
    if bundle.is_dir():
        logger.info("index: %s", bundle)
        return bundle
    logger.info("index: building %s", bundle)
    argv = [
        "index",
        "build",
        "--model",
        str(model),
        "--data",
        spec,
        "--out",
        str(bundle),
        *_limit_args(config),
        "--cache",
        str(config.cache),
        "--device",
        config.device,
    ]
    if run(argv) != 0 or not bundle.is_dir():
        raise UpError(f"building the index did not produce {bundle}; see the log above")
    return bundle


def up(config: UpConfig, run: Runner) -> int:
    """Prepare data, model and bundle as needed, then serve (unless `config.serve` is False)."""
    config.state_dir.mkdir(parents=True, exist_ok=True)
    spec = choose_data(config)
    model = ensure_model(config, spec, run)
    bundle = ensure_bundle(config, spec, model, run)
    if not config.serve:
        logger.info("ready to serve: fashionbert serve --model %s --index %s", model, bundle)
        return 0
    host = "localhost" if config.host in ("127.0.0.1", "0.0.0.0") else config.host
    logger.info("serving on http://%s:%d/ (demo page; API docs at /docs)", host, config.port)
    argv = ["serve", "--model", str(model), "--index", str(bundle), "--host", config.host]
    return run([*argv, "--port", str(config.port), "--device", config.device])
