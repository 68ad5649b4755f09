"""The precision rule: bf16 only where the device computes it natively."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from model import precision
from model.config import DEFAULT_TEXT_MODEL, TINY_BERT, FashionBertConfig, resolve_text_model
from model.fashionbert import FashionBert
from model.inference import FashionBertInference
from model.precision import bf16_autocast, native_bf16, uses_bf16

CPU = torch.device("cpu")


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64",
    reason="reads x86 flags from /proc/cpuinfo",
)
def test_native_bf16_on_the_cpu_matches_its_instruction_sets() -> None:
    """Against the kernel's own list: torch's probes agree with what /proc/cpuinfo says the CPU has."""
    flags = _cpu_flags()
    assert native_bf16("cpu") == bool({"amx_tile", "avx512_bf16"} & flags)


def test_autocast_runs_bf16_only_where_native_and_wanted(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    for native in (True, False):
        monkeypatch.setattr(precision, "native_bf16", lambda device_type, native=native: native)
        for wanted in (True, False):
            with bf16_autocast(CPU, wanted):
                product = a @ b
            expected = torch.bfloat16 if native and wanted else torch.float32
            assert product.dtype == expected, (native, wanted)
            assert uses_bf16(CPU, wanted) == (native and wanted)


def test_a_gpu_that_only_emulates_bf16_is_not_native(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pre-Ampere GPU: torch says it "supports" bf16 counting emulation, which is slower than fp32."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    native_bf16.cache_clear()
    try:
        assert not native_bf16("cuda")
    finally:
        native_bf16.cache_clear()


def test_an_unknown_device_type_is_not_native() -> None:
    assert not native_bf16("mps") and not native_bf16("xla")


@pytest.mark.parametrize("native", [True, False])
def test_serving_holds_bf16_weights_only_where_native(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """`bf16_weights` on a CPU without native bf16 (AVX2 only) keeps fp32 weights and fp32 arithmetic, and
    says so: emulated bf16 there costs many times fp32."""
    monkeypatch.setattr(precision, "native_bf16", lambda device_type: native)
    torch.manual_seed(0)
    config = FashionBertConfig(bert=dict(TINY_BERT), patch_feature_dim=32, num_patches=16, embed_dim=16)
    tokenizer = AutoTokenizer.from_pretrained(resolve_text_model(DEFAULT_TEXT_MODEL))
    inference = FashionBertInference(FashionBert(config), tokenizer, device="cpu", bf16_weights=True)
    assert next(inference.model.parameters()).dtype == (torch.bfloat16 if native else torch.float32)
    assert inference.precision == ("bf16" if native else "fp32")
    patches = np.random.default_rng(0).standard_normal((2, 16, 32)).astype(np.float32)
    scores = inference.match(inference.tokenize(["black satin midi skirt", "red wool coat"]), patches)
    assert scores.dtype == np.float32 and np.isfinite(scores).all()
