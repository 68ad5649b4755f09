"""IndexConfig: how a bundle's recall indexes and re-rank features are built; saved in its manifest."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

REFINE_CHOICES = ("", "SQ8", "SQfp16", "Flat")
TEXT_STATES_LAYOUTS = ("ragged", "padded")


@dataclass(frozen=True)
class IndexConfig:
    # faiss index_factory string of both recall indexes, or "auto": Flat for small catalogues, else
    # OPQ + IVF + PQ with nlist from the catalogue size. `{nlist}` and `{m}` in a string are filled in.
    factory: str = "auto"
    # auto: catalogues smaller than this are searched exactly. A flat scan of 10k vectors takes well
    # under a millisecond, and below ~39 * 256 points PQ codebooks are undertrained anyway.
    exact_below: int = 10_000
    # auto: PQ bytes per recall vector; 0 = embed_dim // 4 (4-d sub-vectors keep PQ error low).
    pq_bytes: int = 0
    # auto: re-score the IVF-PQ shortlist with a finer copy of the vectors ("Flat" = exact, faiss RFlat).
    # SQ8 costs embed_dim bytes per item and lifts recall@100 from ~0.8 to ~0.95 at the same nprobe.
    refine: str = "SQ8"
    refine_k_factor: int = 4  # the shortlist is k * this long
    nprobe: int = 64  # default inverted lists visited per query; the service may override per call
    # Vectors sampled to train the recall quantizers; 0 = auto (50 per inverted list, at least 39 * 256).
    train_points: int = 0
    # OPQ rotation training rounds (0: no OPQ in "auto"). Each retrains the PQ, so faiss' default of 50
    # (after a first PQ of 40 k-means rounds) made OPQ most of a CPU build; 4 loses nothing measurable.
    opq_iterations: int = 4
    # k-means rounds of the recall PQ codebooks. faiss' default of 25 spent 8 s an index on 20k items (a
    # third of a build's quantizer training); 10 gave the same recall@100 on refined search.
    pq_iterations: int = 10
    # faiss factory string of the patch-feature codec (used through sa_encode / sa_decode): PQ64 on
    # 1280-d patches is 64 bytes a patch, 1 KB an item (16 pooled patches) against 160 KB of float16.
    patch_codec: str = "PQ64"
    # Items whose stored patches (16 pooled each) train the codec: 2,048 give 128 per PQ centroid.
    codec_train_items: int = 2048
    # Models with a fusion layer: faiss factory string of the codecs of each item's stored side states
    # (one for text states, one for patch states, trained on the same items as the patch codec).
    # PQ64 on MiniLM's 384-d states is 64 bytes a state, about 4 KB an item (a 45-piece text + 16
    # patches) against 48 KB of float16; "" stores float16.
    states_codec: str = "PQ64"
    # How a fused model's text states are laid out: "ragged" stores each item's word pieces only, one
    # after another (offsets from the token lengths), "padded" every item at max_text_len positions, as
    # bundles before stop 34 did. H&M's texts fill 45 of 64 positions on average: 2.9 KB an item
    # against 4.1 KB (benchmarks/RESULTS.md "Text length"). Adding to a bundle keeps the layout it was built with.
    text_states_layout: str = "ragged"
    chunk_items: int = 1024  # items encoded per pass: bounds memory to one chunk of float16 patches
    batch_size: int = 128  # model batch for the image and text towers
    # Querybank normalisation (`model.querybank`, when a build is given a bank catalogue): items drawn
    # from it at most; the build's offsets cost bank x rows dot products.
    querybank_items: int = 20_000
    use_gpu: bool = True  # train and add on the GPU when faiss-gpu sees one; the bundle is always CPU
    seed: int = 0

    def __post_init__(self) -> None:
        if self.refine not in REFINE_CHOICES:
            raise ValueError(f"refine must be one of {REFINE_CHOICES}, got {self.refine!r}")
        if self.text_states_layout not in TEXT_STATES_LAYOUTS:
            raise ValueError(
                f"text_states_layout must be one of {TEXT_STATES_LAYOUTS}, got {self.text_states_layout!r}"
            )
        for name in (
            "nprobe",
            "refine_k_factor",
            "pq_iterations",
            "codec_train_items",
            "chunk_items",
            "batch_size",
            "querybank_items",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("exact_below", "pq_bytes", "train_points", "opq_iterations"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.factory.strip() or not self.patch_codec.strip():
            raise ValueError("factory and patch_codec must be faiss factory strings (factory may be 'auto')")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IndexConfig:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown IndexConfig fields {unknown}")
        return cls(**data)
