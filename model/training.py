"""Pre-training FashionBERT: MLM + MPM + alignment + recall contrastive, weighted by the adaptive loss.

One step on a batch of B catalogue items:
1. the recall towers embed every text and image alone (symmetric in-batch InfoNCE);
2. each item gets false pairs, its image or its text swapped for a hard negative: by default one from the
   batch, same sub-category, falling back to category, then anything, drawn by the towers' similarity
   (the batch is built from small same-sub-category groups so such negatives exist); with `mine_top_k`,
   `negatives_per_item` drawn from the item's top K in the whole train split by the towers, the very
   confusions the re-ranker meets behind the recall stage;
3. the joint encoder reads the true and false pairs, masked (MLM, MPM, alignment in one pass; unmasked
   when neither reconstruction task is trained); with `listwise`, alignment also ranks each true pair
   against its mined false pairs;
4. the adaptive loss solves the task weights and the step descends the weighted sum.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from model.adaptive_loss import AdaptiveLoss
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import FashionBertConfig, resolve_text_model
from model.data import TrainingData, grouped_batches
from model.fashionbert import FashionBert, FashionBertForPretraining, StackedMLP
from model.inference import FashionBertInference, pick_device
from model.losses import (
    alignment_loss,
    contrastive_loss,
    listwise_alignment_loss,
    masked_language_loss,
    masked_patch_loss,
)
from model.masking import mask_patches, mask_tokens
from model.patch_features import PatchFeatureConfig
from model.precision import bf16_autocast, precision_name

logger = logging.getLogger(__name__)

TASKS = ("mlm", "mpm", "alignment", "contrastive")


@dataclass
class TrainConfig:
    batch_size: int = 32
    group_size: int = 4  # items per same-sub-category group in a batch (hard negatives)
    # Mine negatives by tower similarity at this softmax temperature; None = uniform (the paper).
    negative_temperature: float | None = 0.05
    # Mine negatives from each item's top K in the whole train split (0 = from the batch, as above),
    # refreshed every `mine_every` steps, `negatives_per_item` false pairs per item.
    mine_top_k: int = 0
    mine_every: int = 200
    negatives_per_item: int = 1
    # With mined negatives, alignment also ranks each true pair against its false pairs of the same side
    # (softmax cross-entropy over them), the ordering re-ranking needs, on top of the binary loss.
    listwise: bool = False
    # Alignment trains only the joint pass: the towers' cosine in the alignment logit is read, not trained,
    # so the cross-encoder must learn what the towers miss instead of sharpening the towers further.
    detach_tower_term: bool = False
    # Alignment also scores the joint pass's head alone (its logit without the tower term): once the towers
    # separate the training pairs, the summed logit saturates and leaves the head no gradient to learn from.
    head_alignment: bool = False
    max_steps: int | None = None
    epochs: float | None = None
    budget_minutes: float | None = None
    learning_rate: float = 1e-4  # pretrained encoder
    head_learning_rate: float = 1e-3  # new parts: patch embeddings, heads, projections
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_clip: float = 1.0
    adaptive: bool = True  # False: equal fixed task weights (the ablation)
    tasks: tuple[str, ...] = TASKS  # a subset trains only those tasks (ablations, fast tests)
    adaptive_scope: str = "last_output"  # shared parameters of the task gradients: ADAPTIVE_SCOPES
    seed: int = 0
    validate_every: int = 200
    validation_queries: int = 100
    validation_negatives: int = 10
    log_every: int = 10
    device: str = "auto"
    bf16: bool = True  # bf16 autocast where the device computes bf16 natively (model/precision.py)

    def __post_init__(self) -> None:
        if self.listwise and not self.mine_top_k:
            raise ValueError("listwise alignment ranks mined false pairs: it needs mine_top_k > 0")
        if "alignment" not in self.tasks and self.listwise:
            raise ValueError("listwise is part of the alignment task, which is not trained")
        if self.adaptive_scope not in ADAPTIVE_SCOPES:
            raise ValueError(f"adaptive_scope must be one of {', '.join(ADAPTIVE_SCOPES)}")

    def total_steps(self, num_items: int) -> int:
        """Steps for the schedule: the explicit count, else the epochs, else a budget-sized guess."""
        if self.max_steps is not None:
            return self.max_steps
        if self.epochs is not None:
            return max(1, math.ceil(self.epochs * num_items / self.batch_size))
        return 1_000_000  # budget only: the schedule decays slowly and the clock stops training


def pick_hard_negatives(
    similarity: torch.Tensor | None,
    subcategories: list[str],
    categories: list[str],
    texts: list[str],
    generator: torch.Generator,
    temperature: float = 0.1,
) -> torch.Tensor:
    """For each row i, a column j != i drawn with probability softmax(similarity) among the batch items
    of the same sub-category (else category, else any) whose text differs from i's; uniform when
    `similarity` is None."""
    n = len(subcategories)
    sub = np.array(subcategories)
    cat = np.array(categories)
    txt = np.array(texts)
    differs = torch.from_numpy(txt[:, None] != txt[None, :])
    tiers = [torch.from_numpy(sub[:, None] == sub[None, :]), torch.from_numpy(cat[:, None] == cat[None, :])]
    choice = torch.empty(n, dtype=torch.long)
    weights = (
        torch.ones(n, n)
        if similarity is None
        else torch.softmax(similarity.detach().float().cpu() / temperature, dim=1)
    )
    for i in range(n):
        allowed = differs[i].clone()
        allowed[i] = False
        if not allowed.any():  # every other item has the same text: any other item will do
            allowed = torch.ones(n, dtype=torch.bool)
            allowed[i] = False
        for tier in tiers:
            if (tier[i] & allowed).any():
                allowed = tier[i] & allowed
                break
        w = weights[i] * allowed
        w = w / w.sum() if w.sum() > 0 else allowed.float() / allowed.sum()
        choice[i] = torch.multinomial(w, 1, generator=generator)[0]
    return choice


def mine_neighbours(
    text_embeddings: np.ndarray, image_embeddings: np.ndarray, codes: np.ndarray, k: int, chunk: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each item's k nearest images for its text (t2i) and k nearest texts for its image (i2t) by tower
    cosine, leaving out the item and every item with the same text (those count as correct, not as
    negatives): two (n, k) index tensors, -1 where fewer than k items qualify."""
    texts, images = torch.from_numpy(text_embeddings).float(), torch.from_numpy(image_embeddings).float()
    codes_t = torch.from_numpy(codes)
    k = min(k, len(codes))

    def nearest(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        rows = []
        for start in range(0, len(queries), chunk):
            similarity = queries[start : start + chunk] @ keys.T
            same_text = codes_t[start : start + chunk, None] == codes_t[None, :]
            similarity.masked_fill_(same_text, -math.inf)
            values, indices = similarity.topk(k, dim=1)
            rows.append(indices.masked_fill_(values == -math.inf, -1))
        return torch.cat(rows)

    return nearest(texts, images), nearest(images, texts)


def draw_mined_negatives(
    neighbours: tuple[torch.Tensor, torch.Tensor],
    indices: list[int],
    per_item: int,
    generator: torch.Generator,
) -> list[tuple[int, int, int]]:
    """`per_item` false pairs for each batch row, as (row, text item, image item) with global item indices,
    alternating which side is swapped so both ranking directions are trained; each drawn without
    replacement from the item's mined neighbours (any other item when it has none)."""
    t2i, i2t = neighbours
    n = len(t2i)
    pairs = []
    for row, item in enumerate(indices):
        sides = [(row + j) % 2 for j in range(per_item)]
        for side, table in ((0, t2i), (1, i2t)):
            wanted = sides.count(side)
            if not wanted:
                continue
            pool = table[item][table[item] >= 0]
            if len(pool) == 0:
                pool = torch.tensor([j for j in range(n) if j != item] or [item])
            picks = pool[torch.randperm(len(pool), generator=generator)[:wanted]]
            picks = picks[torch.arange(wanted) % len(picks)]  # a pool smaller than wanted repeats
            for other in picks.tolist():
                pairs.append((row, item, other) if side == 0 else (row, other, item))
    return pairs


ADAPTIVE_SCOPES = ("last_output", "last_layer", "encoder")


def adaptive_shared_parameters(model: FashionBert, scope: str) -> list[torch.nn.Parameter]:
    """The shared encoder parameters whose task gradients weigh the adaptive loss.

    Each task's gradient costs a backward pass from its loss down to these parameters. `encoder` is the
    whole encoder (K passes through every layer); `last_layer` its last layer; `last_output` that layer's
    feed-forward output block (dense + LayerNorm), the encoder's last operations, reached without going
    back through attention at all.
    """
    last = model.bert.encoder.layer[-1]
    modules = {"last_output": last.output, "last_layer": last, "encoder": model.bert.encoder}
    return list(modules[scope].parameters())


class Trainer:
    """Owns the model, optimiser, schedule and the output folder of one training run."""

    def __init__(
        self,
        model: FashionBert,
        tokenizer: PreTrainedTokenizerBase,
        train: TrainingData,
        validation: TrainingData | None,
        config: TrainConfig,
        out: str | Path,
        data_fingerprint: str = "",
    ):
        self.config = config
        self.out = Path(out)
        self.device = pick_device(config.device)
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self.pretraining = FashionBertForPretraining(model).to(self.device)
        self.train_data, self.validation_data = train, validation
        self.data_fingerprint = data_fingerprint
        self.step, self.best_score, self.elapsed = 0, -math.inf, 0.0
        self.rng = random.Random(config.seed)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.neighbours: tuple[torch.Tensor, torch.Tensor] | None = None
        self.mined_at = 0

        encoder_params = list(model.bert.parameters())
        encoder_ids = {id(p) for p in encoder_params}
        new_params = [p for p in self.pretraining.parameters() if id(p) not in encoder_ids]
        vectors = {id(p) for m in model.modules() if isinstance(m, StackedMLP) for p in m.vectors()}
        is_matrix = lambda p: p.ndim >= 2 and id(p) not in vectors  # noqa: E731 - no decay on biases and norms
        decay = lambda ps: [p for p in ps if is_matrix(p)]  # noqa: E731
        no_decay = lambda ps: [p for p in ps if not is_matrix(p)]  # noqa: E731
        self.optimizer = torch.optim.AdamW(
            [
                {
                    "params": decay(encoder_params),
                    "lr": config.learning_rate,
                    "weight_decay": config.weight_decay,
                },
                {"params": no_decay(encoder_params), "lr": config.learning_rate, "weight_decay": 0.0},
                {
                    "params": decay(new_params),
                    "lr": config.head_learning_rate,
                    "weight_decay": config.weight_decay,
                },
                {"params": no_decay(new_params), "lr": config.head_learning_rate, "weight_decay": 0.0},
            ]
        )
        self.base_lrs = [group["lr"] for group in self.optimizer.param_groups]
        self.total_steps = config.total_steps(len(train))
        shared = adaptive_shared_parameters(model, config.adaptive_scope)
        self.loss = AdaptiveLoss(shared, adaptive=config.adaptive)

    # -- one step ------------------------------------------------------------------------------------

    def _batch(
        self, indices: list[int], data: TrainingData
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        token_ids = [data.token_ids[i] for i in indices]
        length = max(len(ids) for ids in token_ids)
        ids = torch.full((len(indices), length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, sequence in enumerate(token_ids):
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        patches = torch.from_numpy(data.patch_features[indices].astype(np.float32))
        return ids, mask, patches

    def task_losses(self, indices: list[int], data: TrainingData) -> dict[str, torch.Tensor]:
        """The four task losses of one batch (graph kept for the adaptive weighting)."""
        model, device, config = self.model, self.device, self.config
        b = len(indices)
        if config.mine_top_k:
            # False pairs from the whole split; their items join the batch after its own b rows, those
            # whose text a pair reads first, so the text tower runs only on the first `num_texts` rows.
            mined = draw_mined_negatives(self.neighbours, indices, config.negatives_per_item, self.generator)
            text_extra = sorted({t for _, t, _ in mined} - set(indices))
            image_extra = sorted({m for _, _, m in mined} - set(indices) - set(text_extra))
            items = indices + text_extra + image_extra
            num_texts = b + len(text_extra)
            row_of = {item: row for row, item in enumerate(items)}
            false_text = torch.tensor([row_of[t] for _, t, _ in mined], dtype=torch.long)
            false_image = torch.tensor([row_of[m] for _, _, m in mined], dtype=torch.long)
            false_rows = torch.tensor([row for row, _, _ in mined], dtype=torch.long)
            false_sides = torch.tensor([int(t != indices[row]) for row, t, _ in mined], dtype=torch.long)
        else:
            items, num_texts = indices, b
        ids, mask, patches = self._batch(items, data)
        with bf16_autocast(device, config.bf16):
            text_embeddings = model.encode_text(ids[:num_texts].to(device), mask[:num_texts].to(device))
            image_embeddings = model.encode_image(patches.to(device))  # (len(items), E)
        if not config.mine_top_k:
            similarity = text_embeddings.detach() @ image_embeddings.detach().T  # (B, B)
            meta = [data.subcategories[i] for i in indices], [data.categories[i] for i in indices]
            texts = [data.texts[i] for i in indices]
            temperature = config.negative_temperature
            scores = similarity if temperature else None
            negative_image = pick_hard_negatives(scores, *meta, texts, self.generator, temperature or 1.0)
            negative_text = pick_hard_negatives(
                None if scores is None else scores.T, *meta, texts, self.generator, temperature or 1.0
            )
            # One false pair per item, alternating which side is swapped so both ranking directions are
            # trained: (text_i, image_neg) or (text_neg, image_i).
            rows = torch.arange(b)
            swap_image = rows % 2 == 0
            false_text = torch.where(swap_image, rows, negative_text)
            false_image = torch.where(swap_image, negative_image, rows)
        # Pairs: every true (text_i, image_i), then the false ones.
        text_rows = torch.cat([torch.arange(b), false_text])
        image_rows = torch.cat([torch.arange(b), false_image])
        labels = torch.cat([torch.ones(b), torch.zeros(len(false_text))])
        pair_ids, pair_mask, pair_patches = ids[text_rows], mask[text_rows], patches[image_rows]
        # Mask only for the reconstruction tasks being trained: without them the alignment head reads whole
        # pairs, as at serving time (a masked colour word can make a near-duplicate pair undecidable).
        if "mlm" in config.tasks:
            special = torch.tensor(
                [
                    self.tokenizer.get_special_tokens_mask(r, already_has_special_tokens=True)
                    for r in pair_ids.tolist()
                ],
                dtype=torch.bool,
            )
            masked_ids, mlm_positions, mlm_targets = mask_tokens(
                pair_ids,
                pair_mask.bool() & ~special,
                self.tokenizer.mask_token_id,
                len(self.tokenizer),
                model.config.mlm_probability,
                self.generator,
            )
        else:
            masked_ids, mlm_positions, mlm_targets = pair_ids, torch.zeros(0, 2, dtype=torch.long), None
        pooled_patches = model.pool_patches(pair_patches)
        if "mpm" in config.tasks:
            masked_patches, mpm_positions, mpm_targets = mask_patches(
                pooled_patches, model.config.mpm_probability, self.generator
            )
        else:
            masked_patches, mpm_positions, mpm_targets = (
                pooled_patches,
                torch.zeros(0, 2, dtype=torch.long),
                None,
            )
        # The alignment logit adds the towers' cosine of each pair (see FashionBert.alignment_logits).
        tower_similarity = (text_embeddings[text_rows] * image_embeddings[image_rows]).sum(-1)
        if config.detach_tower_term:
            tower_similarity = tower_similarity.detach()
        with bf16_autocast(device, config.bf16):
            outputs = self.pretraining(
                masked_ids.to(device),
                pair_mask.to(device),
                masked_patches.to(device),
                mlm_positions.to(device),
                mpm_positions.to(device),
                tower_similarity,
            )
        losses = {
            "alignment": alignment_loss(outputs.alignment_logits, labels.to(device)),
            "contrastive": contrastive_loss(  # in-batch InfoNCE over the batch's own items
                text_embeddings[:b], image_embeddings[:b], model.logit_scale.exp().clamp(max=100)
            ),
        }
        if mlm_targets is not None:
            losses["mlm"] = masked_language_loss(outputs.mlm_logits, mlm_targets.to(device))
        if mpm_targets is not None:
            cnn_targets = mpm_targets[:, : model.config.cnn_feature_dim]  # colour is an input, not a target
            losses["mpm"] = masked_patch_loss(outputs.mpm_predictions, cnn_targets.to(device))
        scored = [outputs.alignment_logits]
        if config.head_alignment:
            scored.append(outputs.alignment_head_logits)
            head_loss = alignment_loss(outputs.alignment_head_logits, labels.to(device))
            losses["alignment"] = losses["alignment"] + head_loss
        if config.listwise:
            for logits in scored:
                losses["alignment"] = losses["alignment"] + listwise_alignment_loss(
                    logits[:b], logits[b:], false_rows.to(device), false_sides.to(device)
                )
        return {name: losses[name] for name in config.tasks}

    def mine(self) -> None:
        """Refresh every train item's tower neighbours (the pool `mine_top_k` draws false pairs from)."""
        from model.evaluation import text_codes

        data = self.train_data
        inference = FashionBertInference(self.model, self.tokenizer, device=self.device)
        self.neighbours = mine_neighbours(
            inference.encode_token_ids(data.token_ids),
            inference.encode_images(data.patch_features),
            text_codes(data.catalogue),
            self.config.mine_top_k,
        )
        self.mined_at = self.step

    def _set_learning_rate(self) -> float:
        factor = warmup_cosine(self.step, self.config.warmup_steps, self.total_steps)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor
        return factor

    def train_step(self, indices: list[int]) -> dict[str, Any]:
        self.model.train()
        self.pretraining.train()
        self._set_learning_rate()
        if self.config.mine_top_k and (
            self.neighbours is None or self.step - self.mined_at >= self.config.mine_every
        ):
            self.mine()
            self.model.train()
        losses = self.task_losses(indices, self.train_data)
        weighted = self.loss(losses)
        self.optimizer.zero_grad(set_to_none=True)
        weighted.total.backward()
        torch.nn.utils.clip_grad_norm_(self.pretraining.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.step += 1
        return {
            "step": self.step,
            "loss": float(weighted.total.detach()),
            **{f"loss/{name}": float(value.detach()) for name, value in losses.items()},
            **{f"weight/{name}": value for name, value in weighted.weights.items()},
        }

    # -- the run -------------------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        config = self.config
        self.out.mkdir(parents=True, exist_ok=True)
        log_path = self.out / "metrics.jsonl"
        deadline = None if config.budget_minutes is None else config.budget_minutes * 60 - self.elapsed
        started = time.monotonic()
        pairs_seen, last_record, first_step = 0, {}, self.step
        budget_only = deadline is not None and config.max_steps is None and config.epochs is None
        progress = tqdm(total=self.total_steps if self.total_steps < 1_000_000 else None, initial=self.step)
        stop = False
        with open(log_path, "a") as log:
            while not stop:
                for indices in grouped_batches(
                    self.train_data, config.batch_size, config.group_size, self.rng
                ):
                    record = self.train_step(indices)
                    pairs_seen += len(indices)
                    wall = time.monotonic() - started
                    record["pairs_per_s"] = pairs_seen / max(wall, 1e-9)
                    record["elapsed_s"] = self.elapsed + wall
                    last_record = record
                    progress.update(1)
                    if budget_only and (self.step - first_step) % 20 == 0:
                        # Size the cosine schedule to the budget from the measured step time, again every
                        # 20 steps: a machine that gets busier or quieter moves the end, not the deadline.
                        per_step = wall / max(1, self.step - first_step)
                        self.total_steps = self.step + max(1, int((deadline - wall) / per_step))
                    if self.step % config.log_every == 0 or self.step == 1:
                        progress.set_postfix(
                            {
                                k.split("/")[-1] + ("" if k.startswith("loss") else "_w"): f"{v:.3g}"
                                for k, v in record.items()
                                if k.startswith(("loss/", "weight/"))
                            }
                            | {"pairs/s": f"{record['pairs_per_s']:.1f}"}
                        )
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                    if self.step % config.validate_every == 0:
                        self._validate_and_keep_best(log, record)
                    out_of_time = deadline is not None and wall >= deadline
                    if self.step >= self.total_steps or out_of_time:
                        stop = True
                        break
        progress.close()
        self.elapsed += time.monotonic() - started
        final = self._validate_and_keep_best(None, last_record)
        self.save_state()
        plot_training(log_path, self.out / "training.png")
        return final

    def _validate_and_keep_best(self, log, record: dict[str, Any]) -> dict[str, Any]:
        metrics = self.validate()
        metrics["step"] = self.step
        score = metrics.get("validation/score", -self.step)
        if log is not None:
            log.write(json.dumps({"step": self.step, **metrics}) + "\n")
            log.flush()
        logger.info("step %d validation %s", self.step, {k: round(v, 2) for k, v in metrics.items()})
        if score > self.best_score or not (self.out / "best").exists():
            self.best_score = score
            summary = {
                "data_fingerprint": self.data_fingerprint,
                "steps": self.step,
                "wall_time_s": record.get("elapsed_s", self.elapsed),
                "train_items": len(self.train_data),
                "train_config": asdict(self.config),
                "final_metrics": metrics,
                "pairs_per_s": record.get("pairs_per_s"),
                "precision": precision_name(self.device, self.config.bf16),
            }
            save_checkpoint(self.model, self.tokenizer, self.out / "best", summary)
        self.save_state()
        return metrics

    def validate(self) -> dict[str, float]:
        """Quick sampled Rank@1 on the validation split (fewer queries and negatives than the full eval)."""
        if self.validation_data is None or len(self.validation_data) < 2:
            return {}
        from model.evaluation import EvalConfig, evaluate_sampled

        inference = FashionBertInference(self.model, self.tokenizer, device=self.device)
        data = self.validation_data
        report = evaluate_sampled(
            inference,
            data.catalogue,
            data.patch_features,
            EvalConfig(
                num_queries=self.config.validation_queries,
                num_negatives=self.config.validation_negatives,
                seed=0,
            ),
        )
        report = {f"validation/{k}": v for k, v in report.items()}
        report["validation/score"] = (
            report.get("validation/sampled/i2t/R@1", 0.0) + report.get("validation/sampled/t2i/R@1", 0.0)
        ) / 2
        return report

    # -- resume --------------------------------------------------------------------------------------

    def save_state(self) -> None:
        """Model, optimiser and counters of the latest step, for `--resume` (safetensors + JSON, no pickle)."""
        last = self.out / "last"
        save_checkpoint(self.model, self.tokenizer, last, {"steps": self.step})
        tensors, scalars = {}, {}
        for index, state in self.optimizer.state_dict()["state"].items():
            for name, value in state.items():
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
        scalars = {
            "step": self.step,
            "best_score": self.best_score if math.isfinite(self.best_score) else None,
            "elapsed": self.elapsed,
            "rng": list(self.rng.getstate()[1]),
            "rng_version": self.rng.getstate()[0],
        }
        tmp = last / "optimizer.safetensors.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(last / "optimizer.safetensors")
        (last / "trainer_state.json").write_text(json.dumps(scalars))

    def load_state(self) -> bool:
        last = self.out / "last"
        if not (last / "trainer_state.json").is_file():
            return False
        model, _ = load_checkpoint(last)
        self.model.load_state_dict(model.state_dict())
        scalars = json.loads((last / "trainer_state.json").read_text())
        tensors = load_file(str(last / "optimizer.safetensors"))
        state_dict = self.optimizer.state_dict()
        state: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            state[int(index)][name] = value.to(self.device) if name != "step" else value
        state_dict["state"] = dict(state)
        self.optimizer.load_state_dict(state_dict)
        self.step = scalars["step"]
        self.best_score = scalars["best_score"] if scalars["best_score"] is not None else -math.inf
        self.elapsed = scalars["elapsed"]
        self.rng.setstate((scalars["rng_version"], tuple(scalars["rng"]), None))
        self.generator.manual_seed(self.config.seed + self.step)
        logger.info("resumed from %s at step %d", last, self.step)
        return True


def plot_training(log_path: Path, out: Path) -> None:
    """PNG of the task losses and the adaptive weights over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    records = [r for r in records if "loss" in r]
    if not records:
        return
    steps = [r["step"] for r in records]
    fig, (losses, weights) = plt.subplots(1, 2, figsize=(11, 4))
    for task in TASKS:
        losses.plot(steps, [r.get(f"loss/{task}", np.nan) for r in records], label=task)
        weights.plot(steps, [r.get(f"weight/{task}", np.nan) for r in records], label=task)
    losses.set(title="task losses", xlabel="step", yscale="log")
    weights.set(title="adaptive task weights", xlabel="step", ylim=(0, 1))
    losses.legend()
    weights.legend()
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor at `step`: linear warm-up over `warmup_steps`, cosine decay to 0 at `total_steps`."""
    warmup = min(1.0, (step + 1) / max(1, warmup_steps))
    progress = min(1.0, step / max(1, total_steps))
    return warmup * 0.5 * (1 + math.cos(math.pi * progress))


def build_model(
    config: FashionBertConfig, pretrained: bool = True
) -> tuple[FashionBert, PreTrainedTokenizerBase]:
    """A fresh FashionBERT: pretrained BERT from `config.text_model`, or random when `config.bert` is set and
    `pretrained` is False (tiny test models)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_text_model(config.text_model))
    model = FashionBert.from_pretrained_text_model(config) if pretrained else FashionBert(config)
    return model, tokenizer


def grow_colour_path(model: FashionBert) -> FashionBert:
    """A trained model that reads patch features with colour histograms appended (model/colour.py): its
    weights, plus colour paths whose last layers start at zero, so it scores exactly as before until
    fine-tuning teaches it colour. Fine-tuning a checkpoint this way costs a fraction of training anew."""
    patch_config = replace(PatchFeatureConfig.from_dict(model.config.patch_features), colour=True)
    if model.config.colour_dim:
        raise ValueError("the model already reads colour histograms")
    config = replace(
        model.config,
        patch_feature_dim=model.config.patch_feature_dim + patch_config.colour_dim,
        colour_dim=patch_config.colour_dim,
        patch_features=patch_config.to_dict(),
    )
    grown = FashionBert(config, bert=model.bert)
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(".colour" in key for key in missing), (missing, unexpected)
    return grown
