"""Masking for the two reconstruction tasks: word pieces (MLM) and image patches (MPM)."""

from __future__ import annotations

import torch


def mask_tokens(
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BERT masking: pick `probability` of the maskable word pieces; of those 80% -> [MASK],
    10% -> a random word piece, 10% unchanged.

    Returns (masked_ids (B, T), positions (M, 2) as (row, token), targets (M,) original ids).
    At least one position per batch is picked so the loss is always defined.
    """
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & maskable
    if not chosen.any():
        candidates = maskable.nonzero()
        pick = candidates[torch.randint(len(candidates), (1,), generator=generator)]
        chosen[pick[:, 0], pick[:, 1]] = True
    masked = input_ids.clone()
    roll = torch.rand(input_ids.shape, generator=generator)
    masked[chosen & (roll < 0.8)] = mask_token_id
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator)
    replace = chosen & (roll >= 0.8) & (roll < 0.9)
    masked[replace] = random_ids[replace]
    positions = chosen.nonzero()  # (M, 2)
    return masked, positions, input_ids[chosen]


def mask_patches(
    patches: torch.Tensor, probability: float = 0.10, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero about `probability` of the patches, as the paper does.

    Returns (masked patches (B, N, D), positions (P, 2) as (row, patch), targets (P, D) originals).
    """
    chosen = torch.rand(patches.shape[:2], generator=generator) < probability  # (B, N)
    if not chosen.any():
        chosen[0, torch.randint(patches.shape[1], (1,), generator=generator)] = True
    masked = patches.clone()
    masked[chosen] = 0
    return masked, chosen.nonzero(), patches[chosen]
