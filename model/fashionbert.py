"""FashionBERT (Gao et al., SIGIR 2020): one BERT reads `[CLS] text [SEP] image patches`.

Reads top to bottom: patch embeddings -> the model (encoder = transformers' `BertModel`) with its
narrow outward face (`encode_text`, `encode_image`, `match`) -> the pre-training wrapper that
exposes the task heads' outputs. Losses live in `model/losses.py`, not here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.bert.modeling_bert import BertOnlyMLMHead

from model.config import FashionBertConfig, resolve_text_model

TEXT_SEGMENT, IMAGE_SEGMENT = 0, 1


def mlp(in_dim: int, hidden: int, out_dim: int, zero_last: bool = False) -> nn.Sequential:
    """LayerNorm -> Linear -> GELU -> Linear: the shape of every small head on pooled features here.
    `zero_last` starts its output at zero, so a path added to a trained model changes nothing yet."""
    net = nn.Sequential(
        nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim)
    )
    if zero_last:
        nn.init.zeros_(net[-1].weight)
        nn.init.zeros_(net[-1].bias)
    return net


def colour_path(in_dim: int, out_dim: int) -> nn.Module | None:
    """Colour histograms -> a term added to the CNN path's output; None without colour. Its last layer starts
    at zero, so a trained model grown colour paths (`model.training.grow_colour_path`) computes what it did
    before."""
    return mlp(in_dim, out_dim, out_dim, zero_last=True) if in_dim else None


class StackedMLP(nn.Module):
    """`members` separate `mlp` networks, (B, D) -> (K, B, E), with their
    weights stacked on a leading member axis: an ensemble's forward is two batched matmuls instead of a pass
    per member, which for a single image query costs mostly call overhead (benchmarks/RESULTS.md, "Image tower ensemble").
    Each member is initialised as those `nn` layers would be, in that order, so a member built under a
    seed is the network that seed gives; `zero_last` starts every member's output at zero."""

    def __init__(self, members: int, in_dim: int, hidden: int, out_dim: int, zero_last: bool = False):
        super().__init__()
        nets = [mlp(in_dim, hidden, out_dim, zero_last) for _ in range(members)]

        def stacked(tensors: list[torch.Tensor]) -> nn.Parameter:
            return nn.Parameter(torch.stack([t.detach() for t in tensors]))

        self.norm_weight = stacked([net[0].weight for net in nets])  # (K, D)
        self.norm_bias = stacked([net[0].bias for net in nets])  # (K, D)
        self.weight1 = stacked([net[1].weight.T for net in nets])  # (K, D, H): input-major, as bmm reads it
        self.bias1 = stacked([net[1].bias for net in nets])  # (K, H)
        self.weight2 = stacked([net[3].weight.T for net in nets])  # (K, H, E)
        self.bias2 = stacked([net[3].bias for net in nets])  # (K, E)

    def __len__(self) -> int:
        return len(self.norm_weight)

    def vectors(self) -> list[nn.Parameter]:
        """The members' norms and biases: vectors, though stacked into matrices (no weight decay on them)."""
        return [self.norm_weight, self.norm_bias, self.bias1, self.bias2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, x.shape[-1:])  # the members normalise the same input: once, then their affines
        x = x * self.norm_weight[:, None] + self.norm_bias[:, None]  # (K, B, D)
        x = F.gelu(torch.baddbmm(self.bias1[:, None], x, self.weight1))  # (K, B, H)
        return torch.baddbmm(self.bias2[:, None], x, self.weight2)  # (K, B, E)


class ImageTowers(nn.Module):
    """The image towers: an image's pooled patch feature (B, D) -> its recall embedding (B, E), normalised.
    Each member is an MLP on the CNN part plus the colour path on the colour histogram, summed (ImageNet
    features barely tell beige from black: model/colour.py); an ensemble of members fitted apart
    (`model.tower_fit`) serves the normalised mean of their normalised embeddings."""

    def __init__(self, members: int, cnn_dim: int, colour_dim: int, hidden: int, embed_dim: int):
        super().__init__()
        self.cnn_dim = cnn_dim
        self.projection = StackedMLP(members, cnn_dim, hidden, embed_dim)
        # The colour path's last layer starts at zero, so a trained model grown colour paths
        # (`model.training.grow_colour_path`) computes what it did before.
        self.colour = (
            StackedMLP(members, colour_dim, embed_dim, embed_dim, zero_last=True) if colour_dim else None
        )

    def __len__(self) -> int:
        return len(self.projection)

    @property
    def dtype(self) -> torch.dtype:
        return self.projection.weight1.dtype

    def members(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled features -> (K, B, E) each member's embedding, not normalised."""
        embedding = self.projection(pooled[:, : self.cnn_dim])
        if self.colour is not None:
            embedding = embedding + self.colour(pooled[:, self.cnn_dim :])
        return embedding

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        members = F.normalize(self.members(pooled).float(), dim=-1)
        return members[0] if len(members) == 1 else F.normalize(members.mean(0), dim=-1)


class PatchEmbeddings(nn.Module):
    """Patch feature -> hidden size, plus the patch's grid-position and the image segment embedding. The
    CNN part and the colour histogram (when there is one) are projected apart and summed."""

    def __init__(self, config: FashionBertConfig, bert_config: BertConfig):
        super().__init__()
        hidden = bert_config.hidden_size
        self.cnn_dim = config.cnn_feature_dim
        self.projection = nn.Linear(self.cnn_dim, hidden)
        self.colour_projection = colour_path(config.colour_dim, hidden)
        self.grid_position = nn.Embedding(config.encoder_patches, hidden)
        self.layer_norm = nn.LayerNorm(hidden, eps=bert_config.layer_norm_eps)
        self.dropout = nn.Dropout(bert_config.hidden_dropout_prob)

    def forward(self, patch_features: torch.Tensor, segment_embedding: torch.Tensor) -> torch.Tensor:
        # patch_features: (B, N, D) pooled patches -> (B, N, H)
        n = patch_features.shape[1]
        positions = torch.arange(n, device=patch_features.device)
        # The dtype of the weights (bf16 when serving holds bf16); an embedding's, as the projection may be
        # an int8 module (model.inference.int8_encoder_copy) whose weight is not a tensor.
        patch_features = patch_features.to(self.grid_position.weight.dtype)
        x = self.projection(patch_features[..., : self.cnn_dim])
        if self.colour_projection is not None:
            x = x + self.colour_projection(patch_features[..., self.cnn_dim :])
        x = x + self.grid_position(positions) + segment_embedding
        return self.dropout(self.layer_norm(x))


def pool_patches(patch_features: torch.Tensor, pool: int) -> torch.Tensor:
    """Average `pool` x `pool` neighbouring patches of a square, row-major grid: (B, N, D) -> (B, N / pool^2, D)."""
    if pool == 1:
        return patch_features
    b, n, d = patch_features.shape
    grid = math.isqrt(n)
    assert grid * grid == n and grid % pool == 0, f"{n} patches do not pool {pool} x {pool}"
    x = patch_features.reshape(b, grid, grid, d).permute(0, 3, 1, 2)  # (B, D, G, G)
    x = F.avg_pool2d(x.float(), pool).to(patch_features.dtype)  # (B, D, G / pool, G / pool)
    return x.flatten(2).transpose(1, 2)  # (B, N / pool^2, D)


class FashionBert(nn.Module):
    """The matching model. Outward face: `encode_text`, `encode_image` (recall) and `match` (re-rank)."""

    def __init__(self, config: FashionBertConfig, bert: BertModel | None = None):
        super().__init__()
        if bert is None:
            bert = BertModel(BertConfig(**config.bert), add_pooling_layer=True)
        self.config = config
        self.bert = bert
        bert_config = bert.config
        hidden = bert_config.hidden_size
        self.patch_embeddings = PatchEmbeddings(config, bert_config)
        # Alignment head on [CLS] (after BERT's own pooler, as in next-sentence prediction) and on the product
        # of the pooled text and patch states of the same joint pass: the product hands the classifier the
        # multiplicative text-image interaction that [CLS] alone only reaches after long training.
        self.alignment_head = nn.Linear(2 * hidden, 1)
        # The alignment logit adds the towers' cosine at a learned scale: the cross-encoder learns what the
        # towers miss instead of relearning, from a few thousand pairs, what they already know.
        self.tower_scale = nn.Parameter(torch.tensor(10.0))
        # Text tower: the shared encoder on the text alone, mean-pooled and projected.
        self.text_projection = nn.Linear(hidden, config.embed_dim)
        # Image tower: the patch network's features pooled over the image and read by small MLPs, so recall
        # embeddings cost no encoder pass (index builds and image queries stay cheap). `image_towers` > 1 is
        # an ensemble of towers fitted apart (`model.tower_fit`), their embeddings averaged.
        self.image_towers = self.new_image_towers(config.image_towers)
        self.logit_scale = nn.Parameter(torch.tensor(2.6593))  # log(1 / 0.07), as CLIP
        self.check_fusion_layer()

    def check_fusion_layer(self) -> None:
        """At least the top layer must read text and image together, or nothing would cross-attend."""
        layers = len(self.bert.encoder.layer)
        if not 0 <= self.config.fusion_layer < layers:
            raise ValueError(f"fusion_layer {self.config.fusion_layer} is not in [0, {layers - 1}]")

    def new_image_towers(self, members: int = 1) -> ImageTowers:
        """Freshly initialised image towers of this model's shape (`model.tower_fit` fits new ones)."""
        config = self.config
        hidden = self.bert.config.hidden_size
        return ImageTowers(members, config.cnn_feature_dim, config.colour_dim, hidden, config.embed_dim)

    @classmethod
    def from_pretrained_text_model(cls, config: FashionBertConfig) -> FashionBert:
        """Start from a pretrained BERT (local folder or hub name); the new parts are randomly initialised."""
        bert = BertModel.from_pretrained(resolve_text_model(config.text_model), add_pooling_layer=True)
        config.bert = bert.config.to_diff_dict()
        config.bert.pop("architectures", None)
        return cls(config, bert)

    # -- building blocks ---------------------------------------------------------------------------------

    def _image_segment(self) -> torch.Tensor:
        return self.bert.embeddings.token_type_embeddings.weight[IMAGE_SEGMENT]

    def _encode(self, embeddings: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return self._layers(embeddings, attention_mask, 0, len(self.bert.encoder.layer))

    def _layers(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, start: int, stop: int
    ) -> torch.Tensor:
        """Encoder layers `start`..`stop` - 1 over (B, L, H) states, with the (B, L) padding mask (None: none)."""
        if start == stop:
            return hidden
        mask = create_bidirectional_mask(
            config=self.bert.config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        for layer in self.bert.encoder.layer[start:stop]:
            hidden = layer(hidden, mask)
        return hidden

    def pool_patches(self, patch_features: torch.Tensor) -> torch.Tensor:
        """The patch network's grid -> the coarser grid the encoder reads (see `patch_pool`). A grid already
        that coarse (index bundles store it) passes through."""
        if patch_features.shape[1] == self.config.encoder_patches:
            return patch_features
        return pool_patches(patch_features, self.config.patch_pool)

    # The joint pass in two halves (`fusion_layer`): each side alone through the layers below the fusion
    # layer, then both together. A catalogue item's side depends on nothing else, so index bundles store it
    # and a query's re-rank pass runs only the layers from the fusion layer up.

    def text_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`[CLS] text [SEP]` through the layers below the fusion layer, attending to itself: (B, T, H)."""
        text = self.bert.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))
        return self._layers(text, attention_mask, 0, self.config.fusion_layer)

    def image_states(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, D) pooled patches through the layers below the fusion layer, attending to themselves:
        (B, N, H)."""
        image = self.patch_embeddings(patches, self._image_segment())
        return self._layers(image, None, 0, self.config.fusion_layer)

    def fuse(
        self, text_states: torch.Tensor, attention_mask: torch.Tensor, image_states: torch.Tensor
    ) -> torch.Tensor:
        """Both sides' states through the layers from the fusion layer up, attending across: (B, T + N, H)."""
        patch_mask = attention_mask.new_ones(image_states.shape[:2])
        hidden = torch.cat([text_states, image_states.to(text_states.dtype)], dim=1)  # (B, T + N, H)
        mask = torch.cat([attention_mask, patch_mask], dim=1)
        return self._layers(hidden, mask, self.config.fusion_layer, len(self.bert.encoder.layer))

    def joint_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, patches: torch.Tensor
    ) -> torch.Tensor:
        """Encode `[CLS] text [SEP] patches`: (B, T) ids + (B, N, D) pooled patches -> (B, T + N, H)."""
        return self.fuse(
            self.text_states(input_ids, attention_mask), attention_mask, self.image_states(patches)
        )

    def alignment_head_logits(self, joint_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The joint pass's own part of the alignment logit: (B, T + N, H) and the (B, T) text mask -> (B,)."""
        text_len = attention_mask.shape[1]
        text = _mean_pool(joint_hidden[:, :text_len], attention_mask)  # (B, H)
        patches = joint_hidden[:, text_len:].mean(1)  # (B, H)
        features = torch.cat([self.bert.pooler(joint_hidden), text * patches], dim=-1)  # (B, 2H)
        return self.alignment_head(features).squeeze(-1).float()

    def alignment_logits(
        self, joint_hidden: torch.Tensor, attention_mask: torch.Tensor, tower_similarity: torch.Tensor
    ) -> torch.Tensor:
        """Alignment logit of a joint pass: (B, T + N, H), the (B, T) text mask and the pairs' (B,) tower
        cosine -> (B,)."""
        return self.with_tower_term(
            self.alignment_head_logits(joint_hidden, attention_mask), tower_similarity
        )

    def with_tower_term(self, head_logits: torch.Tensor, tower_similarity: torch.Tensor) -> torch.Tensor:
        """The alignment logit from the head's: (B,) head logits + tower_scale x the pairs' (B,) tower cosine."""
        return head_logits + self.tower_scale * tower_similarity

    # -- outward face ------------------------------------------------------------------------------------

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text alone -> L2-normalised recall embedding (B, E)."""
        hidden = self._encode(self.bert.embeddings(input_ids=input_ids), attention_mask)  # (B, T, H)
        return self._text_embedding(hidden, attention_mask)

    def encode_text_and_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode_text` and `text_states` from one pass: the text tower is the shared encoder reading the
        text alone, so its pass goes through the states below the fusion layer. An index build of a fused
        model needs both for every item: (B, E) embedding, (B, T, H) states."""
        states = self.text_states(input_ids, attention_mask)
        hidden = self._layers(states, attention_mask, self.config.fusion_layer, len(self.bert.encoder.layer))
        return self._text_embedding(hidden, attention_mask), states

    def _text_embedding(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text tower's head: the top layer's (B, T, H) states, mean-pooled, projected, normalised."""
        return F.normalize(self.text_projection(_mean_pool(hidden, attention_mask)).float(), dim=-1)

    def encode_image(self, patch_features: torch.Tensor) -> torch.Tensor:
        """Image patches alone -> L2-normalised recall embedding (B, E): the mean of the towers' embeddings."""
        pooled = patch_features.float().mean(1)  # (B, D): the patch network's global average pool
        return self.image_towers(pooled.to(self.image_towers.dtype))  # bf16 when serving holds bf16

    def match(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        patch_features: torch.Tensor,
        tower_similarity: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cross-attention alignment score of each (text, image) pair: (B,) logits, higher is better.
        `tower_similarity` (B,), when given, is the pairs' tower cosine computed earlier (a recall stage's
        scores, or FashionBertInference's cached text embeddings); else the towers run here."""
        if tower_similarity is None:
            # A text query pairs one text with every candidate: embed each distinct text once.
            unique_ids, inverse = torch.unique(input_ids, dim=0, return_inverse=True)
            unique_mask = torch.zeros_like(unique_ids).index_copy_(0, inverse, attention_mask)
            text_embeddings = self.encode_text(unique_ids, unique_mask)[inverse]  # (B, E)
            tower_similarity = (text_embeddings * self.encode_image(patch_features)).sum(-1)  # (B,)
        text = self.text_states(input_ids, attention_mask)
        image = self.image_states(self.pool_patches(patch_features))
        return self.match_states(text, attention_mask, image, tower_similarity)

    def match_states(
        self,
        text_states: torch.Tensor,
        attention_mask: torch.Tensor,
        image_states: torch.Tensor,
        tower_similarity: torch.Tensor,
    ) -> torch.Tensor:
        """`match` from each side's states below the fusion layer (what index bundles store): (B,) logits."""
        hidden = self.fuse(text_states, attention_mask, image_states)
        return self.alignment_logits(hidden, attention_mask, tower_similarity).float()


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


@dataclass
class PretrainingOutputs:
    """What the task heads predicted; `model/losses.py` turns these into losses."""

    mlm_logits: torch.Tensor  # (M, V) at the masked word pieces
    mpm_predictions: torch.Tensor  # (P, D_cnn) at the masked patches: their CNN features
    alignment_logits: torch.Tensor  # (B,) one per pair
    alignment_head_logits: torch.Tensor  # (B,) the same without the tower term (see `alignment_logits`)


class FashionBertForPretraining(nn.Module):
    """FashionBERT with the pre-training heads: masked language, masked patch and alignment."""

    def __init__(self, model: FashionBert):
        super().__init__()
        self.model = model
        bert_config = model.bert.config
        self.mlm_head = BertOnlyMLMHead(bert_config)
        # Tie the word-piece decoder to the input embeddings, as BERT pre-training does.
        self.mlm_head.predictions.decoder.weight = model.bert.embeddings.word_embeddings.weight
        hidden = bert_config.hidden_size
        self.mpm_head = nn.Sequential(
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.LayerNorm(hidden, eps=bert_config.layer_norm_eps),
            nn.Linear(hidden, model.config.cnn_feature_dim),  # the CNN's feature; colour is not predicted
        )

    def forward(
        self,
        masked_input_ids: torch.Tensor,  # (B, T) pair texts with [MASK]s
        attention_mask: torch.Tensor,  # (B, T)
        masked_patches: torch.Tensor,  # (B, N, D) pair images, pooled, with masked patches zeroed
        mlm_positions: torch.Tensor,  # (M, 2) row/token index of each masked word piece
        mpm_positions: torch.Tensor,  # (P, 2) row/patch index of each masked patch
        tower_similarity: torch.Tensor,  # (B,) the pairs' recall-tower cosine, unmasked inputs
    ) -> PretrainingOutputs:
        # One joint pass serves all three tasks, as in the paper: true and false pairs are masked alike,
        # so the alignment head cannot read "was masked" as "matches".
        model = self.model
        hidden = model.joint_hidden(masked_input_ids, attention_mask, masked_patches)  # (B, T + N, H)
        text_len = masked_input_ids.shape[1]
        mlm_hidden = hidden[mlm_positions[:, 0], mlm_positions[:, 1]]  # (M, H)
        mpm_hidden = hidden[mpm_positions[:, 0], text_len + mpm_positions[:, 1]]  # (P, H)
        head_logits = model.alignment_head_logits(hidden, attention_mask)
        return PretrainingOutputs(
            mlm_logits=self.mlm_head(mlm_hidden),
            mpm_predictions=self.mpm_head(mpm_hidden),
            alignment_logits=model.with_tower_term(head_logits, tower_similarity),
            alignment_head_logits=head_logits,
        )
