"""`fashionbert up`: which data it picks, which steps it runs or skips, and the real path end to end."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest

from app.quickstart import UpConfig, UpError, bundle_key, choose_data, default_data, up

REPO = Path(__file__).resolve().parents[2]


class FakeCommands:
    """Stands in for the `fashionbert` subcommands: records each argv and makes what it would make."""

    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, argv: Sequence[str]) -> int:
        argv = list(argv)
        self.calls.append(argv)
        command = argv[0]
        if command == self.fail:
            return 1
        value = lambda flag: argv[argv.index(flag) + 1]  # noqa: E731
        if command in ("train", "fit-image-tower"):
            model = Path(value("--out")) / "best" if command == "train" else Path(value("--out"))
            model.mkdir(parents=True)
            (model / "model.safetensors").write_bytes(b"weights")
        elif command == "index":
            Path(value("--out")).mkdir(parents=True)
        return 0

    def commands(self) -> list[str]:
        return [" ".join(call[:2]) if call[0] == "index" else call[0] for call in self.calls]


def test_default_data_is_the_shared_hm_sample_when_present(tmp_path: Path) -> None:
    work = tmp_path / "work" / "main"
    work.mkdir(parents=True)
    assert default_data([work]) is None
    hm = tmp_path / "work" / "shared" / "data" / "hm"
    hm.mkdir(parents=True)
    (hm / "articles.csv").write_text("article_id\n")
    assert default_data([tmp_path / "elsewhere", work]) == f"hm:{hm.resolve()}"


def test_given_data_wins_and_synthetic_forces_the_generated_catalogue(tmp_path: Path) -> None:
    assert choose_data(UpConfig(state_dir=tmp_path, data="myntra:/data/myntra")) == "myntra:/data/myntra"
    spec = choose_data(UpConfig(state_dir=tmp_path, data="synthetic", limit=16))
    assert spec == f"jsonl:{(tmp_path / 'synthetic' / 'catalogue.jsonl').resolve()}"
    assert len(Path(spec.removeprefix("jsonl:")).read_text().splitlines()) == 16


def test_first_run_trains_indexes_and_serves_then_reuses_both(tmp_path: Path) -> None:
    config = UpConfig(state_dir=tmp_path / "state", data="synthetic", limit=8, port=8123, tiny=True)
    first = FakeCommands()
    assert up(config, first) == 0
    assert first.commands() == ["train", "fit-image-tower", "index build", "serve"]
    train, fit, index, serve = first.calls
    assert train[train.index("--limit") + 1] == "8" and "--tiny" in train and "--resume" not in train
    assert train[train.index("--cache") + 1] == index[index.index("--cache") + 1]
    # The image towers are refitted on the same data and limit, from the trained checkpoint.
    assert fit[fit.index("--model") + 1] == str(config.state_dir / "model" / "best")
    assert (
        fit[fit.index("--limit") + 1] == "8"
        and fit[fit.index("--data") + 1] == train[train.index("--data") + 1]
    )
    fitted = str(config.state_dir / "model" / "fitted")
    assert fit[fit.index("--out") + 1] == fitted
    assert serve[serve.index("--port") + 1] == "8123"
    assert serve[serve.index("--model") + 1] == fitted
    assert index[index.index("--model") + 1] == fitted
    assert serve[serve.index("--index") + 1] == index[index.index("--out") + 1]

    assert "--fusion-layer" not in train  # the tiny BERT's two layers stay joint

    again = FakeCommands()
    assert up(config, again) == 0
    assert again.commands() == ["serve"], "model and bundle are reused"

    minilm = FakeCommands()  # MiniLM trains as the served default: fused below its last layer
    assert up(UpConfig(**{**config.__dict__, "tiny": False, "state_dir": tmp_path / "minilm"}), minilm) == 0
    train = minilm.calls[0]
    assert "--tiny" not in train and train[train.index("--fusion-layer") + 1] == "5"

    other_data = FakeCommands()
    assert up(UpConfig(**{**config.__dict__, "limit": 6, "serve": False}), other_data) == 0
    assert other_data.commands() == ["index build"], "new data: a new bundle, the same model"


def test_bundle_key_follows_data_limit_and_model(tmp_path: Path) -> None:
    model = tmp_path / "best"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"a")
    key = bundle_key("jsonl:/x/c.jsonl", 10, model)
    assert key == bundle_key("jsonl:/x/../x/c.jsonl", 10, model)
    assert key != bundle_key("jsonl:/x/c.jsonl", 11, model)
    assert key != bundle_key("hm:/x/c.jsonl", 10, model)
    time.sleep(0.01)
    (model / "model.safetensors").write_bytes(b"bb")
    assert key != bundle_key("jsonl:/x/c.jsonl", 10, model)


def test_interrupted_training_resumes_and_failures_say_so(tmp_path: Path) -> None:
    config = UpConfig(state_dir=tmp_path, data="synthetic", limit=8, serve=False)
    (tmp_path / "model" / "last").mkdir(parents=True)
    commands = FakeCommands()
    up(config, commands)
    assert "--resume" in commands.calls[0]

    with pytest.raises(UpError, match="training did not produce"):
        up(UpConfig(state_dir=tmp_path / "b", data="synthetic", limit=8), FakeCommands(fail="train"))
    with pytest.raises(UpError, match="building the index"):
        up(UpConfig(state_dir=tmp_path / "c", data="synthetic", limit=8), FakeCommands(fail="index"))
    with pytest.raises(UpError, match="fitting the image towers"):
        up(
            UpConfig(state_dir=tmp_path / "d", data="synthetic", limit=8),
            FakeCommands(fail="fit-image-tower"),
        )

    # A state folder from before the refit step has a trained model only: it is fitted, not retrained.
    older = UpConfig(state_dir=tmp_path / "e", data="synthetic", limit=8, serve=False)
    (older.model_run / "best").mkdir(parents=True)
    (older.model_run / "best" / "model.safetensors").write_bytes(b"weights")
    commands = FakeCommands()
    up(older, commands)
    assert commands.commands() == ["fit-image-tower", "index build"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _subcommands() -> set[str]:
    from app.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if a.dest == "command"]
    return set(sub.choices)


def _fashionbert() -> list[str]:
    """The installed console script (what the README runs), else the same CLI through the module."""
    script = shutil.which("fashionbert")
    return [script] if script else [sys.executable, "-m", "app.cli"]


@pytest.mark.slow
def test_up_from_nothing_to_search(tmp_path: Path) -> None:
    """The README's first command on a tiny configuration: generate, train, index, serve, search."""
    if "index" not in _subcommands():
        pytest.skip("no `fashionbert index` subcommand in this checkout yet")
    port = _free_port()
    argv = [
        *_fashionbert(),
        "up",
        "--data",
        "synthetic",
        "--tiny",
        "--limit",
        "40",
        "--budget-minutes",
        "0.2",
    ]
    argv += ["--state-dir", str(tmp_path / "state"), "--port", str(port), "--device", "cpu"]
    log = (tmp_path / "up.log").open("w")
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath}  # for the `python -m app.cli` fallback
    server = subprocess.Popen(argv, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=30) as client:
            deadline = time.monotonic() + 600
            while True:
                assert server.poll() is None, (
                    f"fashionbert up exited:\n{(tmp_path / 'up.log').read_text()[-4000:]}"
                )
                assert time.monotonic() < deadline, "not ready in time"
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            text = client.post("/search/text", json={"query": "red striped t-shirt", "k": 5})
            assert text.status_code == 200, text.text
            hits = text.json()["results"]
            assert len(hits) == 5 and client.get(hits[0]["image_url"]).status_code == 200
            photo = next((tmp_path / "state" / "synthetic" / "images").iterdir())
            image = client.post(
                "/search/image", files={"file": (photo.name, photo.read_bytes(), "image/png")}
            )
            assert image.status_code == 200 and len(image.json()["results"]) == 10, image.text
            assert client.get("/").status_code == 200
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()

    # The second run finds the model and the bundle and goes straight to serving.
    start = time.monotonic()
    again = subprocess.run(
        [*argv, "--no-serve"], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env
    )
    assert again.returncode == 0, again.stderr
    assert "training" not in again.stderr and "building" not in again.stderr
    assert time.monotonic() - start < 60
    summary = json.loads((tmp_path / "state" / "model" / "best" / "summary.json").read_text())
    assert summary["steps"] >= 1
    fitted = json.loads((tmp_path / "state" / "model" / "fitted" / "config.json").read_text())
    assert fitted["image_towers"] == 8  # served: the trained model with its image towers refitted
