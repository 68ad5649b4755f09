"""Numpy-in, numpy-out inference over a loaded FashionBERT: what `index/` and `app/` call.

Owns the device, the precision (`model/precision.py`) and tokenization, so callers never touch torch or the tokenizer.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from model.checkpoint import WEIGHTS_FILE, load_checkpoint
from model.fashionbert import FashionBert
from model.files import sha256_file
from model.pair_states import STATES_DTYPE, PairStates
from model.patches import pool_grid
from model.precision import bf16_autocast, precision_name, uses_bf16

logger = logging.getLogger(__name__)


class DeviceUnavailableError(RuntimeError):
    """The device asked for is not on this machine (CUDA on a CPU-only one): a flag to change, not a bug."""


def pick_device(name: str | torch.device = "auto") -> torch.device:
    """`auto` takes CUDA when present, else the CPU; asking for CUDA without one fails clearly."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailableError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


class FashionBertInference:
    """A FashionBERT ready to answer queries: tokenize, embed, match."""

    def __init__(
        self,
        model: FashionBert,
        tokenizer: PreTrainedTokenizerBase,
        device: str | torch.device = "cpu",
        fingerprint: str = "",
        text_cache_size: int = 50_000,
        bf16_weights: bool = False,
        int8_matching: bool = False,
    ):
        self.device = pick_device(device) if isinstance(device, str) else device
        # Re-ranking through a copy whose encoder layers run int8 (CPU only), made before any bf16 cast.
        matcher = int8_encoder_copy(model) if int8_matching and self.device.type == "cpu" else None
        # bf16 weights skip autocast's per-call cast of every fp32 weight (serving only: no training);
        # where the device has no native bf16 everything stays fp32.
        dtype = torch.bfloat16 if uses_bf16(self.device, bf16_weights) else torch.float32
        self.model = model.to(self.device, dtype).eval()
        self.matcher = matcher.eval() if matcher is not None else self.model
        self.tokenizer = tokenizer
        self.config = model.config
        self.fingerprint = fingerprint
        # Text-tower embeddings by token ids: re-ranking meets the same catalogue texts query after query.
        self._text_cache: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self.text_cache_size = text_cache_size

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str = "auto", bf16_weights: bool = False, int8_matching: bool = False
    ) -> FashionBertInference:
        model, tokenizer = load_checkpoint(path)
        return cls(
            model,
            tokenizer,
            device=device,
            fingerprint=model_fingerprint(path),
            bf16_weights=bf16_weights,
            int8_matching=int8_matching,
        )

    @property
    def tower_logit_scale(self) -> float:
        """The towers' contrastive inverse temperature, as training clamps it: querybank normalisation's beta."""
        return float(self.model.logit_scale.detach().exp().clamp(max=100))

    @property
    def precision(self) -> str:
        """What the encoder's matrix work runs in here: "bf16" where the device computes it natively."""
        return precision_name(self.device)

    @property
    def int8_matching(self) -> bool:
        return self.matcher is not self.model

    # -- text ----------------------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Word-piece ids with [CLS] ... [SEP], truncated to the model's text length."""
        encoded = self.tokenizer(
            list(texts), truncation=True, max_length=self.config.max_text_len, add_special_tokens=True
        )
        return [list(ids) for ids in encoded["input_ids"]]

    def pad(self, token_ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad id lists into (B, T) ids and attention mask on the model's device."""
        length = max(len(ids) for ids in token_ids)
        ids = torch.full((len(token_ids), length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(token_ids), length), dtype=torch.long)
        for row, sequence in enumerate(token_ids):
            ids[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
            mask[row, : len(sequence)] = 1
        return ids.to(self.device), mask.to(self.device)

    # -- outward face ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """(n, E) float32 L2-normalised text embeddings."""
        return self.encode_token_ids(self.tokenize(texts), batch_size)

    @torch.inference_mode()
    def encode_token_ids(self, token_ids: Sequence[Sequence[int]], batch_size: int = 256) -> np.ndarray:
        out = []
        for chunk in _chunks(token_ids, batch_size):
            ids, mask = self.pad(chunk)
            with bf16_autocast(self.device):
                out.append(self.model.encode_text(ids, mask).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.config.embed_dim), np.float32)

    @torch.inference_mode()
    def encode_images(self, patch_features: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """(n, N, D) patch features -> (n, E) float32 L2-normalised image embeddings."""
        out = []
        for start in range(0, len(patch_features), batch_size):
            patches = self._patches(patch_features[start : start + batch_size])
            with bf16_autocast(self.device):
                out.append(self.model.encode_image(patches).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.config.embed_dim), np.float32)

    @torch.inference_mode()
    def match(
        self,
        token_ids: Sequence[Sequence[int]],
        patch_features: np.ndarray,
        batch_size: int = 128,
        tower_similarity: np.ndarray | None = None,
    ) -> np.ndarray:
        """Cross-attention alignment logits of pairs (token_ids[i], patch_features[i]): (n,) float32.

        `tower_similarity` (n,): the pairs' tower cosine where a recall stage already has it (the
        service's recall scores); without it the towers run here, catalogue texts through the cache."""
        assert len(token_ids) == len(patch_features), "match scores pairs: one text per image"
        out = []
        for start in range(0, len(token_ids), batch_size):
            chunk = token_ids[start : start + batch_size]
            ids, mask = self.pad(chunk)
            patches = self._patches(patch_features[start : start + batch_size])
            if tower_similarity is None:
                texts = torch.from_numpy(self.cached_text_embeddings(chunk)).to(self.device)
                with bf16_autocast(self.device):
                    images = self.model.encode_image(patches)
                similarity = (texts * images).sum(-1)  # (n,) the towers' cosine
            else:
                similarity = torch.as_tensor(
                    np.asarray(tower_similarity[start : start + batch_size], np.float32), device=self.device
                )
            with self._matcher_context():
                logits = self.matcher.match(ids, mask, patches, tower_similarity=similarity)
            out.append(logits.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0,), np.float32)

    @torch.inference_mode()
    def text_states(
        self, token_ids: Sequence[Sequence[int]], batch_size: int = 256
    ) -> tuple[np.ndarray, np.ndarray]:
        """Texts' side of re-rank pairs: (n, T, H) states below the fusion layer, right-padded to the
        longest text, and the (n, T) bool mask of real word pieces."""
        states, mask = self._empty_text_states(token_ids)
        for start in range(0, len(token_ids), batch_size):
            ids, chunk_mask = self.pad(token_ids[start : start + batch_size])
            with self._matcher_context():
                chunk = self.matcher.text_states(ids, chunk_mask)
            states[start : start + len(ids), : chunk.shape[1]] = chunk.float().cpu().numpy()
        return states, mask

    @torch.inference_mode()
    def encode_token_ids_with_states(
        self, token_ids: Sequence[Sequence[int]], batch_size: int = 256
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`encode_token_ids` and `text_states` at the cost of the first alone (an index build of a fused
        model): (n, E) embeddings, (n, T, H) states and their (n, T) mask."""
        if self.matcher is not self.model:  # the int8 copy's states are not the tower pass's
            return (self.encode_token_ids(token_ids, batch_size), *self.text_states(token_ids, batch_size))
        states, mask = self._empty_text_states(token_ids)
        embeddings = np.zeros((len(token_ids), self.config.embed_dim), np.float32)
        for start in range(0, len(token_ids), batch_size):
            ids, chunk_mask = self.pad(token_ids[start : start + batch_size])
            with bf16_autocast(self.device):
                embedding, chunk = self.model.encode_text_and_states(ids, chunk_mask)
            embeddings[start : start + len(ids)] = embedding.float().cpu().numpy()
            states[start : start + len(ids), : chunk.shape[1]] = chunk.float().cpu().numpy()
        return embeddings, states, mask

    def _empty_text_states(self, token_ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Zero (n, T, H) text states to fill batch by batch, and their (n, T) mask; T the longest text."""
        lengths = np.array([len(ids) for ids in token_ids], dtype=np.int64)
        mask = np.arange(lengths.max(initial=0)) < lengths[:, None]
        return np.zeros((*mask.shape, self.model.bert.config.hidden_size), STATES_DTYPE), mask

    @torch.inference_mode()
    def image_states(self, patch_features: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Images' side of re-rank pairs: (n, N, D) patch features (either grid) -> (n, N', H) states below
        the fusion layer on the grid the encoder reads."""
        out = []
        for start in range(0, len(patch_features), batch_size):
            patches = self.model.pool_patches(self._patches(patch_features[start : start + batch_size]))
            with self._matcher_context():
                out.append(self.matcher.image_states(patches).float().cpu().numpy().astype(STATES_DTYPE))
        hidden = self.model.bert.config.hidden_size
        empty = np.zeros((0, self.config.encoder_patches, hidden), STATES_DTYPE)
        return np.concatenate(out) if out else empty

    @torch.inference_mode()
    def score_states(self, pairs: PairStates, batch_size: int = 128) -> np.ndarray:
        """Cross-attention alignment logits of pairs given as side states: (n,) float32, what `match`
        gives for the same pairs (to the states' float16 rounding) for the cost of the layers above the
        fusion layer alone."""
        out = []
        dtype = self.matcher.bert.embeddings.word_embeddings.weight.dtype
        for start in range(0, len(pairs), batch_size):
            rows = slice(start, start + batch_size)
            longest = int(pairs.text_mask[rows].sum(1).max())  # a batch pads only to its own longest text
            # Copies: the service hands read-only views (a query's side broadcast over its candidates).
            mask = torch.tensor(pairs.text_mask[rows, :longest], dtype=torch.long, device=self.device)
            text = torch.tensor(pairs.text[rows, :longest]).to(self.device, dtype)
            image = torch.tensor(pairs.image[rows]).to(self.device, dtype)
            similarity = torch.tensor(pairs.tower_similarity[rows], dtype=torch.float32)
            with self._matcher_context():
                logits = self.matcher.match_states(text, mask, image, similarity.to(self.device))
            out.append(logits.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0,), np.float32)

    def _matcher_context(self) -> contextlib.AbstractContextManager:
        """The int8 copy takes fp32 activations (its kernels quantize them); autocast would hand it bf16."""
        return bf16_autocast(self.device) if not self.int8_matching else contextlib.nullcontext()

    def cached_text_embeddings(self, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """(n, E) text-tower embeddings, each distinct text encoded once and kept (least recently used
        dropped past `text_cache_size`)."""
        keys = [tuple(ids) for ids in token_ids]
        missing = list(dict.fromkeys(key for key in keys if key not in self._text_cache))
        if missing:
            for key, embedding in zip(missing, self.encode_token_ids(missing), strict=True):
                self._text_cache[key] = embedding
        rows = []
        for key in keys:
            self._text_cache.move_to_end(key)
            rows.append(self._text_cache[key])
        while len(self._text_cache) > self.text_cache_size:
            self._text_cache.popitem(last=False)
        return np.stack(rows)

    def pool_patches(self, patch_features: np.ndarray) -> np.ndarray:
        """(n, N, D) patch features on the patch network's grid -> on the grid the encoder reads (pooled
        `patch_pool` x `patch_pool`): what index bundles store, and the same scores."""
        return pool_grid(patch_features, self.config.patch_pool)

    def _patches(self, patch_features: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(patch_features, dtype=np.float32)).to(self.device)


def int8_encoder_copy(model: FashionBert) -> FashionBert | None:
    """A copy of `model` whose encoder layers' and patch projection's linear maps run int8 with dynamically
    quantized activations (per-channel weights): about twice bf16's matrix throughput on an AVX-512 VNNI
    CPU without AMX, where the re-rank pass is almost all such matmuls. None, with a warning, where this torch cannot do it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated in favour of torchao,
            # whose eager CPU int8 path is many times slower than this one (measured, torch 2.13)
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            quantized = copy.deepcopy(model).float().cpu()
            spec = {torch.nn.Linear: per_channel_dynamic_qconfig}
            quantized.bert.encoder = quantize_dynamic(quantized.bert.encoder, spec, dtype=torch.qint8)
            quantized.patch_embeddings = quantize_dynamic(  # its projection: every patch, 1280 -> hidden
                quantized.patch_embeddings, {"projection": per_channel_dynamic_qconfig}, dtype=torch.qint8
            )
            return quantized
    except (ImportError, AttributeError, RuntimeError) as error:
        logger.warning("int8 matching unavailable (%s): re-ranking runs unquantized", error)
        return None


def model_fingerprint(path: str | Path) -> str:
    """sha256 of the checkpoint's weights file: what an index bundle records to refuse a wrong model."""
    return sha256_file(Path(path) / WEIGHTS_FILE)


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
