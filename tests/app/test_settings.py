"""Settings come from FASHIONBERT_* variables and a .env file, and refuse contradictions."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from app.settings import Settings


def test_environment_with_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FASHIONBERT_MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("FASHIONBERT_MAX_K", "50")
    monkeypatch.setenv("FASHIONBERT_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("FASHIONBERT_ADMIN_API_KEY", "s3cret")
    monkeypatch.setenv("MAX_K", "7")  # no prefix: not ours
    settings = Settings(_env_file=None)
    assert settings.model_dir == tmp_path / "model" and settings.max_k == 50
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert settings.admin_api_key is not None and settings.admin_api_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)


def test_dotenv_file(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text(
        "FASHIONBERT_INDEX_DIR=/bundles/hm\nFASHIONBERT_DEVICE=cpu\nFASHIONBERT_BATCH_WINDOW_MS=5\n"
    )
    settings = Settings(_env_file=env)
    assert settings.index_dir == Path("/bundles/hm") and settings.device == "cpu"
    assert settings.batch_window_ms == 5.0


def test_contradictions_are_refused() -> None:
    with pytest.raises(ValidationError, match="default_k"):
        Settings(_env_file=None, default_k=20, max_k=10)
    with pytest.raises(ValidationError):
        Settings(_env_file=None, device="tpu")


def test_the_app_reads_its_configuration_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from app.main import create_app

    monkeypatch.setenv("FASHIONBERT_MODEL_DIR", str(tmp_path / "model"))
    monkeypatch.setenv("FASHIONBERT_INDEX_DIR", str(tmp_path / "bundle"))
    monkeypatch.setenv("FASHIONBERT_DEFAULT_RERANK_K", "20")
    settings = create_app().state.settings
    assert (settings.model_dir, settings.index_dir) == (tmp_path / "model", tmp_path / "bundle")
    assert settings.default_rerank_k == 20


@pytest.mark.anyio
async def test_start_up_fails_fast_without_a_model_or_index(tmp_path: Path) -> None:
    from app.main import create_app

    for settings in (
        Settings(_env_file=None),
        Settings(_env_file=None, model_dir=tmp_path / "missing", index_dir=tmp_path),
    ):
        app = create_app(settings)
        with pytest.raises(RuntimeError, match="model_dir"):
            async with app.router.lifespan_context(app):
                pass
