"""Re-rank pairs as the joint layers read them, in numpy: what the service batches across requests.

A model with a fusion layer (`FashionBertConfig.fusion_layer`) reads each side alone below it, so a pair
is each side's states there; a catalogue item's side is computed once (index bundles store it) and a
query's re-rank pass runs only the layers above. At fusion layer 0 the states are the embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

STATES_DTYPE = np.float16
"""How side states travel and rest in index bundles: half the bytes of float32, the range hidden states need."""


@dataclass
class PairStates:
    """Re-rank pairs as the joint layers read them: each side's states below the model's fusion layer
    (model.fashionbert.FashionBert.text_states / image_states). The service gathers these from many
    requests into one batch; catalogue items' sides come from the index bundle, computed once."""

    text: np.ndarray  # (n, T, H) text states, right-padded
    text_mask: np.ndarray  # (n, T) bool: real word pieces
    image: np.ndarray  # (n, N, H) patch states
    tower_similarity: np.ndarray  # (n,) the pairs' tower cosine (the logit's tower term)

    def __len__(self) -> int:
        return len(self.tower_similarity)

    @classmethod
    def concat(cls, parts: Sequence[PairStates]) -> PairStates:
        """One batch of several requests' pairs, texts right-padded to the longest among them."""
        if len(parts) == 1:
            return parts[0]
        length = max(part.text.shape[1] for part in parts)

        def pad(array: np.ndarray) -> np.ndarray:
            widths = [(0, 0), (0, length - array.shape[1])] + [(0, 0)] * (array.ndim - 2)
            return np.pad(array, widths)

        return cls(
            text=np.concatenate([pad(part.text) for part in parts]),
            text_mask=np.concatenate([pad(part.text_mask) for part in parts]),
            image=np.concatenate([part.image for part in parts]),
            tower_similarity=np.concatenate([part.tower_similarity for part in parts]),
        )
