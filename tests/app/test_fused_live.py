"""The real app serving a model with a fusion layer: re-ranking starts from the bundle's stored side states
(never from the items' tokens or patch codes) and reports the scores the model gives for the whole pairs."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from app.main import create_app
from app.settings import Settings
from tests.app.conftest import ready_client

ITEMS = 24


@pytest.fixture(scope="module")
def fused(
    fused_checkpoint: Path, hm_slice: Any, build_slice_bundle: Any, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    """The fused tiny model, its bundle of ITEMS real H&M items, and the model called directly."""
    from model.inference import FashionBertInference
    from model.patch_features import PatchFeatureConfig, PatchFeatureExtractor

    inference = FashionBertInference.from_checkpoint(fused_checkpoint, device="cpu")
    out = tmp_path_factory.mktemp("fused-bundle") / "bundle"
    build_slice_bundle(hm_slice[0].items[:ITEMS], out, checkpoint=fused_checkpoint)
    extractor = PatchFeatureExtractor(PatchFeatureConfig.from_dict(inference.config.patch_features))
    return inference, extractor, out


@pytest.fixture(scope="module")
def live(fused_checkpoint: Path, fused: Any) -> Any:
    _, _, bundle = fused
    settings = Settings(_env_file=None, model_dir=fused_checkpoint, index_dir=bundle, device="cpu")
    app = create_app(settings)
    with ready_client(app) as client:
        serving = app.state.service.bundle
        assert serving.stores_states

        def unused(*_: Any) -> None:
            raise AssertionError("re-ranking read tokens or patch codes instead of the stored states")

        serving.patch_features = serving.token_ids = unused
        yield client


def everything(**extra: Any) -> dict[str, Any]:
    return {"k": ITEMS, "recall_k": ITEMS, "rerank_k": ITEMS, **extra}


def test_text_search_reranks_from_stored_states(live: Any, fused: Any, hm_slice: Any) -> None:
    inference, _, _ = fused
    item, exact = hm_slice[0].items[4], hm_slice[1][4:5].astype(np.float32)
    response = live.post("/search/text", json={"query": item.text, **everything()})
    assert response.status_code == 200, response.text
    hits = {hit["id"]: hit for hit in response.json()["results"]}
    hit = hits[item.id]
    # The whole joint pass over the exact features, with the recall cosine as the tower term.
    similarity = np.array([hit["recall_score"]], np.float32)
    expected = inference.match(inference.tokenize([item.text]), exact, tower_similarity=similarity)[0]
    assert hit["rerank_score"] == pytest.approx(float(expected), abs=0.05)
    scores = [hit["rerank_score"] for hit in response.json()["results"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == ITEMS


def test_image_search_reranks_from_stored_states(live: Any, fused: Any, hm_slice: Any) -> None:
    inference, extractor, _ = fused
    item = hm_slice[0].items[7]
    image = Path(item.image).read_bytes()
    response = live.post("/search/image", files={"file": ("q.jpg", image, "image/jpeg")}, data=everything())
    assert response.status_code == 200, response.text
    hit = {hit["id"]: hit for hit in response.json()["results"]}[item.id]
    features = extractor.extract([Image.open(io.BytesIO(image))])
    similarity = np.array([hit["recall_score"]], np.float32)
    expected = inference.match(inference.tokenize([item.text]), features, tower_similarity=similarity)[0]
    assert hit["rerank_score"] == pytest.approx(float(expected), abs=0.05)
