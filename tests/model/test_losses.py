"""Losses on hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from model.losses import (
    alignment_loss,
    contrastive_loss,
    listwise_alignment_loss,
    masked_language_loss,
    masked_patch_loss,
)


def test_masked_patch_loss_is_kl_of_softmaxes() -> None:
    target = torch.tensor([[0.0, math.log(3.0)]])  # softmax -> [1/4, 3/4]
    prediction = torch.tensor([[0.0, 0.0]])  # softmax -> [1/2, 1/2]
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert float(masked_patch_loss(prediction, target)) == pytest.approx(expected, rel=1e-6)
    assert float(masked_patch_loss(target, target)) == pytest.approx(0.0, abs=1e-7)
    # Mean over patches: two patches, one perfect.
    both = masked_patch_loss(torch.cat([prediction, target]), torch.cat([target, target]))
    assert float(both) == pytest.approx(expected / 2, rel=1e-6)


def test_alignment_loss_is_binary_cross_entropy() -> None:
    logits, labels = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])
    expected = (math.log(2) + math.log(1 + math.exp(2))) / 2
    assert float(alignment_loss(logits, labels)) == pytest.approx(expected, rel=1e-6)


def test_masked_language_loss_is_cross_entropy() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    expected = -math.log(math.exp(2) / (math.exp(2) + 2))
    assert float(masked_language_loss(logits, torch.tensor([0]))) == pytest.approx(expected, rel=1e-6)


def test_contrastive_loss_prefers_aligned_pairs() -> None:
    eye = torch.eye(4)
    aligned = contrastive_loss(eye, eye, torch.tensor(10.0))
    shuffled = contrastive_loss(eye, eye[[1, 0, 3, 2]], torch.tensor(10.0))
    # Aligned: each row's logits are [10, 0, 0, 0] -> -log(e^10 / (e^10 + 3)).
    assert float(aligned) == pytest.approx(-math.log(math.exp(10) / (math.exp(10) + 3)), rel=1e-3)
    assert float(shuffled) > float(aligned) + 5


def test_listwise_alignment_loss_ranks_each_true_pair_against_its_own_side() -> None:
    # Row 0 has one false image (side 0) and one false text (side 1); row 1 two false images, listed apart.
    true_logits = torch.tensor([2.0, 0.0])
    false_logits = torch.tensor([1.0, 0.5, 3.0, -1.0])
    rows, sides = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 0])

    def nll(true: float, *false: float) -> float:
        return -true + math.log(sum(math.exp(x) for x in (true, *false)))

    expected = (nll(2.0, 1.0) + nll(2.0, 0.5) + nll(0.0, 3.0, -1.0)) / 3
    loss = listwise_alignment_loss(true_logits, false_logits, rows, sides)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # Shifting every logit of one group leaves it unchanged (only the order within a group matters).
    shifted = listwise_alignment_loss(
        true_logits + torch.tensor([0.0, 5.0]), false_logits + torch.tensor([0, 0, 5.0, 5.0]), rows, sides
    )
    assert float(shifted) == pytest.approx(expected, rel=1e-6)
