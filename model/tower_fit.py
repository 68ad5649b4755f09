"""Fit a fresh image tower to the locked text tower: how a trained model learns to read colour.

The joint fine-tune moves both towers with batches of 24 and a shared encoder, and it taught a newly grown
colour path nothing that showed (gallery R@1 fell 2-3 points in 300 steps). With the text tower locked
(LiT, Zhai et al. 2022, locks the other side) its embeddings of the train split are computed once, and
the image tower, which reads only the pooled patch features, is refitted from scratch with the symmetric
InfoNCE loss at batches of 256 (`fit_tower`): about a minute on CPU, and the cross-encoder, text tower and encoder stay
exactly as trained. On H&M it adds nothing without colour and about 5 points of gallery R@1 with it
(benchmarks/RESULTS.md, "Colour histograms"). Fitted from 8,908 pairs, one tower's R@1 varies by a point or two with its
seed; 8 fitted apart and averaged (`TowerFitConfig.towers`) gain about 3 points over a single one
(benchmarks/RESULTS.md, "Image tower ensemble").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.fashionbert import FashionBert
from model.precision import bf16_autocast
from model.training import warmup_cosine


@dataclass(frozen=True)
class TowerFitConfig:
    steps: int = 600
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    seed: int = 0
    bf16: bool = True  # where the device computes bf16 natively (model/precision.py)
    towers: int = 1  # an ensemble: each fitted apart from its own seed, their embeddings averaged
    # "split": each image is ranked against every text of the split, whose locked embeddings are all at
    # hand, so each step meets the split's hardest false texts; "batch": against the batch's only (the
    # fits before stop 30). Texts are ranked against the batch's images either way.
    text_negatives: str = "split"

    def __post_init__(self) -> None:
        if self.text_negatives not in ("split", "batch"):
            raise ValueError(f"text_negatives must be 'split' or 'batch', not {self.text_negatives!r}")


def fit_image_tower(
    model: FashionBert,
    text_embeddings: np.ndarray,
    patch_features: np.ndarray,
    text_codes: np.ndarray,
    config: TowerFitConfig = TowerFitConfig(),
    log_every: int = 100,
    views: Sequence[np.ndarray] = (),
) -> list[list[float]]:
    """Replace `model`'s image towers by `config.towers` fresh ones fitted so that item i's image embedding
    finds `text_embeddings[i]`, each on its own (seed `config.seed + k`): an ensemble whose averaged
    embeddings generalise better than any member.

    text_embeddings: (n, E) the locked text tower's; patch_features: (n, N, D) the items' patch grids;
    text_codes: (n,) equal codes for identical texts, which count as each other's partners; views: more
    (n, N, D) grids of the same items, each from another view of their photos (`model.views`): every step
    reads each item through one of the photo and its views, drawn at random. Returns each
    tower's loss at every step. Nothing but the image towers and the alignment head's bias changes: the
    alignment logit adds `tower_scale` x the towers' cosine, so new towers move every logit, and the bias
    takes back their average move (`keep_alignment_operating_point`).
    """
    assert all(grids.shape == patch_features.shape for grids in views), "a view must hold every item's grid"
    device = model.logit_scale.device
    # One pooled vector per image: the image tower reads the mean of the grid (FashionBert.encode_image).
    looks = torch.stack(
        [torch.from_numpy(grids.mean(1, dtype=np.float32)) for grids in (patch_features, *views)]
    )
    looks = looks.to(device)  # (1 + views, n, D)
    pooled = looks[0]  # (n, D): the photos themselves
    texts = torch.from_numpy(np.ascontiguousarray(text_embeddings, dtype=np.float32)).to(device)
    codes = torch.from_numpy(np.asarray(text_codes)).to(device)
    scale = model.logit_scale.detach().exp().clamp(max=100)  # the temperature the towers trained at
    with torch.no_grad():
        before = model.encode_image(pooled[:, None])  # (n, E): the towers being replaced
    towers, losses = [], []
    for k in range(config.towers):
        torch.manual_seed(config.seed + k)
        tower = model.new_image_towers().to(device)
        member_config = replace(config, seed=config.seed + k)
        draws = torch.Generator().manual_seed(config.seed + k)

        def embed(
            batch: torch.Tensor, tower: nn.Module = tower, draws: torch.Generator = draws
        ) -> torch.Tensor:
            look = torch.randint(len(looks), (len(batch),), generator=draws).to(device)  # (B,)
            return tower(looks[look, batch])

        losses.append(
            fit_tower(
                embed,
                tower.parameters(),
                texts,
                codes,
                scale,
                member_config,
                log_every,
            )
        )
        towers.append(tower)
    with torch.device("meta"):  # the ensemble's shape from the model, as each member's; weights: the members'
        ensemble = model.new_image_towers(config.towers)
    states = [tower.state_dict() for tower in towers]
    ensemble.load_state_dict({name: torch.cat([s[name] for s in states]) for name in states[0]}, assign=True)
    model.image_towers = ensemble.eval()
    model.config = replace(model.config, image_towers=config.towers)
    with torch.no_grad():
        keep_alignment_operating_point(model, texts, before, model.encode_image(pooled[:, None]))
    return losses


def keep_alignment_operating_point(
    model: FashionBert, kept: torch.Tensor, before: torch.Tensor, after: torch.Tensor
) -> float:
    """Shift the alignment head's bias so that the alignment logit's mean over the items' true pairs and
    as many shuffled ones stays where it was with one side's old embeddings. (n, E) embeddings: `kept`,
    the side that did not move, and the moved side's `before` and `after`; returns the shift. Without it,
    a refit of a model trained for minutes raised its true pairs' cosine by 0.56 on average and its
    alignment accuracy (the logit's sign) fell from 93% to 60%, its AUC unchanged (README, "Image tower
    ensemble")."""
    shuffled = torch.randperm(len(kept), generator=torch.Generator().manual_seed(0)).to(kept.device)
    moved = torch.cat([(kept * (after - before)).sum(-1), (kept * (after - before)[shuffled]).sum(-1)])
    shift = -model.tower_scale.item() * moved.float().mean().item()
    model.alignment_head.bias += shift
    return shift


@dataclass(frozen=True)
class TextTowerFitConfig:
    steps: int = 400
    batch_size: int = 64
    learning_rate: float = 2e-5  # the encoder's; the text projection takes 10x
    weight_decay: float = 0.01
    warmup_steps: int = 20
    # Steps between encodings of every train text, each image's false texts (each step writes its batch's
    # rows fresh); 0: an image is ranked against the batch's texts only.
    refresh_every: int = 200
    seed: int = 0
    bf16: bool = True  # where the device computes bf16 natively (model/precision.py)


def fit_text_tower(
    model: FashionBert,
    token_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    text_embeddings: np.ndarray,
    image_embeddings: torch.Tensor,
    text_codes: np.ndarray,
    config: TextTowerFitConfig = TextTowerFitConfig(),
    log_every: int = 100,
    report: Callable[[], str] | None = None,
) -> tuple[list[float], torch.Tensor]:
    """Train the text tower (the encoder reading text alone, and its projection) against the locked image
    towers, the mirror of `fit_image_tower`: their embeddings of every train photo are at hand, so each
    text of a batch is ranked against all of them, and each batch image against every train text (held
    in a memory, `config.refresh_every`). On H&M 400 steps add 2.6-3.3 points of text-to-image R@1 and
    0.3-1.0 image-to-text, two seeds (benchmarks/RESULTS.md, "Why re-ranking adds nothing yet").

    token_ids, attention_mask: (n, T) the items' right-padded texts; text_embeddings: (n, E) the text
    tower's of them as it stands (the memory's start, and where the operating point is kept from);
    image_embeddings: (V, n, E) the image towers' of the photos and their views, a step reads one of them;
    text_codes: (n,) equal codes for identical texts, which share the probability. The encoder is the joint
    pass's too, so the cross-encoder's states move with it; the alignment head's bias takes back the tower
    term's average move (`keep_alignment_operating_point`). Returns the loss of every step and the moved
    tower's (n, E) embeddings of the texts; leaves the model in eval mode.
    """
    device = model.logit_scale.device
    token_ids, attention_mask = token_ids.to(device), attention_mask.to(device)
    first = torch.from_numpy(np.ascontiguousarray(text_embeddings, dtype=np.float32)).to(device)
    image_embeddings = image_embeddings.float().to(device)
    codes = torch.from_numpy(np.asarray(text_codes)).to(device)
    scale = model.logit_scale.detach().exp().clamp(max=100)
    autocast = bf16_autocast(device, config.bf16)

    def encode(batch: torch.Tensor) -> torch.Tensor:  # (B,) item indices -> (B, E), trimmed to their length
        length = int(attention_mask[batch].sum(1).max())
        with autocast:
            return model.encode_text(token_ids[batch, :length], attention_mask[batch, :length]).float()

    @torch.no_grad()
    def encode_all() -> torch.Tensor:  # (n, E)
        model.eval()
        every = torch.arange(len(token_ids), device=device)
        return torch.cat([encode(chunk) for chunk in every.split(256)])

    groups = [
        {"params": list(model.bert.parameters()), "lr": config.learning_rate},
        {"params": list(model.text_projection.parameters()), "lr": 10 * config.learning_rate},
    ]
    tower = [param for group in groups for param in group["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    generator = torch.Generator().manual_seed(config.seed)
    memory, losses, started = first.clone(), [], time.monotonic()
    for step in range(config.steps):
        for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base_lr * warmup_cosine(step, config.warmup_steps, config.steps)
        if config.refresh_every and step and step % config.refresh_every == 0:
            memory = encode_all()
        model.train()
        batch = torch.randperm(len(token_ids), generator=generator)[: config.batch_size].to(device)
        look = int(torch.randint(len(image_embeddings), (1,), generator=generator))
        images = image_embeddings[look]  # (n, E)
        texts = encode(batch)  # (B, E)
        same = (codes[batch][:, None] == codes[None, :]).float()  # (B, n): identical texts share images
        text_to_image = F.cross_entropy(scale * texts @ images.T, same / same.sum(1, keepdim=True))
        if config.refresh_every:  # each batch image against every train text, its batch's rows fresh
            bank = memory.index_copy(0, batch, texts)  # (n, E)
            image_to_text = F.cross_entropy(scale * images[batch] @ bank.T, same / same.sum(1, keepdim=True))
            memory[batch] = texts.detach()
        else:
            in_batch = same[:, batch]  # (B, B)
            image_to_text = F.cross_entropy(
                scale * images[batch] @ texts.T, in_batch / in_batch.sum(1, keepdim=True)
            )
        loss = (text_to_image + image_to_text) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tower, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if log_every and ((step + 1) % log_every == 0 or step + 1 == config.steps):
            line = (
                f"text tower fit: step {step + 1} loss {losses[-1]:.3f} ({time.monotonic() - started:.0f} s)"
            )
            print(line + (f": {report()}" if report else ""), flush=True)
    moved = encode_all()
    with torch.no_grad():
        keep_alignment_operating_point(model, image_embeddings[0], first, moved)
    return losses, moved


def fit_tower(
    embed: Callable[[torch.Tensor], torch.Tensor],
    params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
    texts: torch.Tensor,
    codes: torch.Tensor,
    scale: float | torch.Tensor,
    config: TowerFitConfig,
    log_every: int = 100,
    report: Callable[[], str] | None = None,
) -> list[float]:
    """Train `params` so that `embed(batch)`, the (B, E) L2-normalised image embeddings of the items at the
    (B,) indices `batch`, finds `texts[batch]`: symmetric InfoNCE at `scale`, items with equal `codes`
    sharing the probability. `params` may be parameter groups with their own "lr" and "weight_decay", each
    scheduled from its own lr; `report()`, when given, is appended to every log line (a validation figure).
    Returns the loss of every step. Also serves the towers of `benchmarks/image_tower_refit.py` and
    `benchmarks/patch_network_finetune.py`."""
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    losses: list[float] = []
    started = time.monotonic()
    for step in range(config.steps):
        factor = warmup_cosine(step, config.warmup_steps, config.steps)
        for group, base_lr in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base_lr * factor
        batch = torch.randperm(len(texts), generator=generator)[: config.batch_size].to(texts.device)
        with bf16_autocast(texts.device, config.bf16):
            embedded = embed(batch)  # (B, E), normalised
        if config.text_negatives == "split":
            loss = info_nce_against_every_text(texts, embedded.float(), batch, codes, scale)
        else:
            loss = symmetric_info_nce(texts[batch], embedded.float(), codes[batch], scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step + 1 == config.steps):
            line = f"tower fit: step {step} loss {losses[-1]:.3f} ({time.monotonic() - started:.0f} s)"
            print(line + (f": {report()}" if report else ""), flush=True)
    return losses


def symmetric_info_nce(
    texts: torch.Tensor, images: torch.Tensor, codes: torch.Tensor, scale: float | torch.Tensor
) -> torch.Tensor:
    """InfoNCE both ways between a batch's (B, E) normalised text and image embeddings at `scale`; items
    with equal `codes` (identical texts) share the target probability."""
    logits = scale * texts @ images.T  # (B, B)
    same = (codes[:, None] == codes[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def info_nce_against_every_text(
    texts: torch.Tensor,
    images: torch.Tensor,
    batch: torch.Tensor,
    codes: torch.Tensor,
    scale: float | torch.Tensor,
) -> torch.Tensor:
    """`symmetric_info_nce` with the image-to-text half widened to every text: the (B, E) normalised
    `images` of the items at the (B,) indices `batch` are each ranked against all (n, E) `texts`; the
    text-to-image half ranks `texts[batch]` against the batch's images as before, items with equal `codes`
    sharing the probability. Identical texts embed alike (to rounding), so an image's copies of its own
    text score as that text does and the image side needs no codes: the same loss as sharing the
    probability among them, without a (B, n) mask. On H&M's 8,908 train items this adds 1-2 points of
    image-to-text gallery R@1 to an 8-tower ensemble (benchmarks/RESULTS.md, "Image tower ensemble")."""
    image_to_text = F.cross_entropy(scale * images @ texts.T, batch)  # (B, n) logits, each row's own text
    in_batch = scale * texts[batch] @ images.T  # (B, B)
    same = (codes[batch][:, None] == codes[batch][None, :]).float()
    text_to_image = F.cross_entropy(in_batch, same / same.sum(1, keepdim=True))
    return (image_to_text + text_to_image) / 2
