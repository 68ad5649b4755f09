"""Querybank normalisation (Bogolin et al., CVPR 2022): push down gallery items that sit close to every query.

A hub (an image near many texts) crowds the top of many queries' lists. The inverted softmax divides a
query's softmax over the gallery by how strongly a bank of other queries already pulls each item; in log
space that is one offset per gallery item, subtracted from the towers' cosine:

    score(q, g) = cos(q, g) - offset(g),   offset(g) = logsumexp_b(beta x cos(b, g)) / beta

so an index stores it beside each vector and a query pays one subtraction. Offsets are centred (mean 0 over
the gallery): rankings are unchanged by the shift, and scores stay on the cosine's scale, which the
re-ranking logit adds.

The bank must hold other items than the gallery: on H&M a bank of the model's training items lifts
gallery R@1 by 2-5 points on a gallery of items the model never saw, but costs 2-2.6 points on the whole
catalogue, where those training items are in the gallery too (contrastive training pushed their images
away from the other training texts, so their offsets come out low and they win near-ties against unseen
items; see the README's Index section). So it is off by default, and a bundle takes its bank from a
catalogue of its own (`index build --querybank-data`), less any product group the gallery holds. An
item's own group never counts in its offset. beta is the towers' own contrastive inverse temperature,
not tuned.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from model.catalogue import Catalogue

# Elements of one (bank, gallery block) score matrix: about 64 MiB of float32.
_BLOCK_ELEMENTS = 1 << 24


def group_hashes(groups: Sequence[str]) -> np.ndarray:
    """(n,) int64 stable hashes of product groups: what bundles store to leave an item's group out."""
    return np.fromiter(
        (int.from_bytes(hashlib.sha256(g.encode()).digest()[:8], "little", signed=True) for g in groups),
        dtype=np.int64,
        count=len(groups),
    )


def draw_bank(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Sorted rows of a bank drawn from `n` candidates: all of them, or `size` drawn with `seed`."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def querybank_offsets(
    bank: np.ndarray, bank_groups: np.ndarray, gallery: np.ndarray, gallery_groups: np.ndarray, beta: float
) -> np.ndarray:
    """(n,) float32 raw offsets of the gallery rows: logsumexp over the bank rows of another group of
    beta x cos(b, g), over beta; NaN for a row with no such bank row. `centred` makes them servable."""
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    gallery = np.asarray(gallery, dtype=np.float32)
    bank_groups, gallery_groups = np.asarray(bank_groups), np.asarray(gallery_groups)
    assert beta > 0, "beta is an inverse temperature"
    assert len(bank) == len(bank_groups) and len(gallery) == len(gallery_groups)
    out = np.full(len(gallery), np.nan, dtype=np.float32)
    if not len(bank):
        return out
    block = max(1, _BLOCK_ELEMENTS // len(bank))
    for start in range(0, len(gallery), block):
        scores = beta * (bank @ gallery[start : start + block].T)  # (bank, block)
        scores[bank_groups[:, None] == gallery_groups[None, start : start + block]] = -np.inf
        peak = scores.max(0)
        kept = np.isfinite(peak)
        total = np.exp(scores[:, kept] - peak[kept]).sum(0)
        out[start : start + block][kept] = (peak[kept] + np.log(total)) / beta
    return out


def centred(raw: np.ndarray, centre: float | None = None) -> tuple[np.ndarray, float]:
    """(offsets minus `centre`, centre); the centre defaults to the raw offsets' mean, so they average 0.
    A row without offset (NaN) gets 0: no normalisation. Items added to a gallery later reuse its centre."""
    if centre is None:
        centre = float(np.nanmean(raw)) if np.isfinite(raw).any() else 0.0
    out = (np.asarray(raw, dtype=np.float32) - np.float32(centre)).astype(np.float32)
    out[~np.isfinite(out)] = 0.0
    return out, centre


class TowerEncoder(Protocol):
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]: ...

    def encode_token_ids(self, token_ids: Sequence[Sequence[int]], batch_size: int = ...) -> np.ndarray: ...

    def encode_images(self, patch_features: np.ndarray, batch_size: int = ...) -> np.ndarray: ...


@dataclass(frozen=True)
class QueryBank:
    """The bank's tower embeddings of both modalities: its texts normalise the image gallery (searched by
    text queries), its images the text gallery."""

    texts: np.ndarray  # (B, E)
    images: np.ndarray  # (B, E)
    groups: np.ndarray  # (B,) group_hashes
    beta: float

    @classmethod
    def encode(
        cls, encoder: TowerEncoder, catalogue: Catalogue, patch_features: np.ndarray, beta: float
    ) -> QueryBank:
        """The towers' embeddings of these items (already chosen, e.g. by `draw_bank`) as a bank."""
        texts = encoder.encode_token_ids(encoder.tokenize([item.text for item in catalogue.items]))
        images = encoder.encode_images(patch_features)
        return cls(texts, images, group_hashes([item.group for item in catalogue.items]), beta)

    def offsets(
        self,
        gallery: Literal["text", "image"],
        embeddings: np.ndarray,
        groups: np.ndarray,
        centre: float | None = None,
    ) -> tuple[np.ndarray, float]:
        """Centred offsets (and the centre) of a gallery of `gallery` embeddings; see `centred`."""
        bank = self.images if gallery == "text" else self.texts
        return centred(querybank_offsets(bank, self.groups, embeddings, groups, self.beta), centre)
