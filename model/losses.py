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
