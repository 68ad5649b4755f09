"""Masking rates, the 80/10/10 replacement and shapes."""

from __future__ import annotations

import torch

from model.masking import mask_patches, mask_tokens

MASK_ID, VOCAB = 103, 30522


def test_token_masking_rates_and_replacements() -> None:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (400, 50), generator=generator)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, 0] = False  # [CLS]
    maskable[:, -5:] = False  # padding
    masked, positions, targets = mask_tokens(ids, maskable, MASK_ID, VOCAB, 0.15, generator)
    assert masked.shape == ids.shape
    chosen = torch.zeros_like(maskable)
    chosen[positions[:, 0], positions[:, 1]] = True
    assert not (chosen & ~maskable).any(), "special and padding positions are never masked"
    rate = chosen.sum() / maskable.sum()
    assert 0.14 < rate < 0.16
    assert torch.equal(targets, ids[chosen])
    now = masked[chosen]
    share_mask = (now == MASK_ID).float().mean()
    share_same = (now == targets).float().mean()
    share_random = 1 - share_mask - share_same
    assert 0.77 < share_mask < 0.83
    assert 0.08 < share_same < 0.12  # 10% kept (+ a few random draws that hit the same id)
    assert 0.08 < share_random < 0.12
    assert torch.equal(masked[~chosen], ids[~chosen]), "unchosen positions are untouched"


def test_token_masking_always_picks_one() -> None:
    ids = torch.tensor([[101, 2000, 102]])
    maskable = torch.tensor([[False, True, False]])
    _, positions, targets = mask_tokens(ids, maskable, MASK_ID, VOCAB, probability=0.0)
    assert positions.tolist() == [[0, 1]] and targets.tolist() == [2000]


def test_patch_masking_zeroes_about_ten_percent() -> None:
    generator = torch.Generator().manual_seed(1)
    patches = torch.rand(200, 64, 8, generator=generator) + 0.1
    masked, positions, targets = mask_patches(patches, 0.10, generator)
    assert masked.shape == patches.shape and targets.shape == (len(positions), 8)
    zeroed = (masked == 0).all(-1)
    assert 0.09 < zeroed.float().mean() < 0.11
    assert torch.equal(zeroed.nonzero(), positions)
    assert torch.equal(targets, patches[zeroed])
    assert torch.equal(masked[~zeroed], patches[~zeroed])
