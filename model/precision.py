"""bf16 where the hardware computes it, fp32 elsewhere: one rule for training, feature passes and serving.

bf16 autocast pays only on a matrix unit that takes bf16: a CUDA GPU that supports it, a CPU with AMX or
AVX-512 BF16. On an x86 CPU with AVX2 alone (an AMD EPYC before Zen 4, many cloud VMs) oneDNN emulates
it: a matmul about 140x slower than fp32, whole passes 7-26x (`benchmarks/precision_speed.py`), so there
every "bf16" switch of this project runs fp32 instead.
"""

from __future__ import annotations

import contextlib
import functools

import torch


def cpu_has(instruction_set: str) -> bool:
    """torch's own probe of the CPU for `instruction_set` ("amx_tile", "avx512_bf16", ...: the ones its oneDNN
    kernels dispatch on); private, so a torch without it reads as "no" (fp32: slower on AMX, never wrong)."""
    return getattr(torch.cpu, f"_is_{instruction_set}_supported", lambda: False)()


@functools.cache
def native_bf16(device_type: str) -> bool:
    """Whether `device_type` ("cpu", "cuda") does bf16 matrix work natively, i.e. faster than fp32."""
    if device_type == "cuda":  # Ampere and newer; an older GPU only emulates it
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        return cpu_has("amx_tile") or cpu_has("avx512_bf16")
    return False


def uses_bf16(device: torch.device, wanted: bool = True) -> bool:
    """bf16 is `wanted` (a config's switch) and `device` computes it natively."""
    return wanted and native_bf16(device.type)


def precision_name(device: torch.device, wanted: bool = True) -> str:
    """What `device`'s matrix work runs in, "bf16" or "fp32", as summaries, benchmarks and the API say it."""
    return "bf16" if uses_bf16(device, wanted) else "fp32"


def bf16_autocast(device: torch.device, wanted: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` where `uses_bf16`; otherwise the ops run in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, wanted))
