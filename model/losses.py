"""The four training losses, each a small function of the heads' outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_language_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the masked word pieces: (M, V) logits, (M,) ids."""
    return F.cross_entropy(logits.float(), targets)


def masked_patch_loss(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The paper's MPM loss: KL(softmax(target feature) || softmax(predicted feature)), mean over patches."""
    target_log_probs = F.log_softmax(targets.float(), dim=-1)
    predicted_log_probs = F.log_softmax(predictions.float(), dim=-1)
    return F.kl_div(predicted_log_probs, target_log_probs, log_target=True, reduction="batchmean")


def alignment_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of text-image alignment on [CLS]: 1 = the text describes the image."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


def contrastive_loss(
    text_embeddings: torch.Tensor, image_embeddings: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric in-batch InfoNCE between the recall towers (row i of each is a true pair)."""
    logits = logit_scale * text_embeddings.float() @ image_embeddings.float().T  # (B, B)
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def listwise_alignment_loss(
    true_logits: torch.Tensor, false_logits: torch.Tensor, false_rows: torch.Tensor, false_sides: torch.Tensor
) -> torch.Tensor:
    """Softmax cross-entropy of each true pair against its own false pairs on one side: (B,) true logits,
    (F,) false logits, each false pair's row in the batch and side (0: its image swapped, 1: its text).

    Re-ranking orders one query's candidates, and binary alignment only asks each pair to fall on the right
    side of a threshold; this asks the true pair to beat the near neighbours it is confused with."""
    groups, inverse = torch.unique(false_rows * 2 + false_sides, return_inverse=True)
    counts = torch.bincount(inverse, minlength=len(groups))
    order = torch.argsort(inverse, stable=True)
    slot = torch.empty_like(inverse)
    slot[order] = (
        torch.arange(len(inverse), device=inverse.device) - (counts.cumsum(0) - counts)[inverse[order]]
    )
    table = false_logits.new_full((len(groups), 1 + int(counts.max())), float("-inf")).float()
    table[:, 0] = true_logits[groups // 2].float()
    table[inverse, 1 + slot] = false_logits.float()
    return F.cross_entropy(table, torch.zeros(len(groups), dtype=torch.long, device=table.device))
