"""Training really learns, resumes where it stopped and writes a complete run folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.config import TINY_BERT, FashionBertConfig
from model.data import prepare_data
from model.evaluation import EvalConfig, evaluate_sampled
from model.inference import FashionBertInference
from model.patch_features import PatchFeatureConfig
from model.training import (
    ADAPTIVE_SCOPES,
    TrainConfig,
    Trainer,
    adaptive_shared_parameters,
    build_model,
    draw_mined_negatives,
    mine_neighbours,
)


def tiny_trainer(hm_slice, out, **overrides) -> Trainer:
    torch.manual_seed(0)
    catalogue, features = hm_slice
    config = FashionBertConfig(bert=dict(TINY_BERT), embed_dim=32, max_text_len=48).with_patch_features(
        PatchFeatureConfig(colour=True)  # hm_slice's
    )
    model, tokenizer = build_model(config, pretrained=False)
    train_config = TrainConfig(
        batch_size=16,
        learning_rate=2e-3,
        head_learning_rate=2e-3,
        warmup_steps=5,
        validate_every=10**6,
        device="cpu",
        **overrides,
    )
    data = prepare_data(catalogue, features, tokenizer, config.max_text_len)
    return Trainer(model, tokenizer, data, data, train_config, out)


def alignment_accuracy(trainer: Trainer) -> float:
    data = trainer.train_data
    inference = FashionBertInference(trainer.model, trainer.tokenizer, device="cpu")
    report = evaluate_sampled(
        inference, data.catalogue, data.patch_features, EvalConfig(num_negatives=5, seed=1)
    )
    return report["sampled/accuracy"], report["sampled/auc"]


def test_a_few_dozen_steps_learn_alignment_far_above_chance(hm_slice, tmp_path) -> None:
    # A tiny random BERT learns alignment within a few dozen steps only without MLM's large gradients
    # swamping its small encoder (the pretrained model's adaptive weights mute MLM instead).
    trainer = tiny_trainer(hm_slice, tmp_path / "run", max_steps=120, tasks=("alignment", "contrastive"))
    _, auc_before = alignment_accuracy(trainer)
    trainer.fit()
    _, auc_after = alignment_accuracy(trainer)
    # Chance is an AUC of 0.5; a broken loss, mask or pairing leaves it there.
    assert auc_before < 0.7
    assert auc_after > 0.7, f"alignment AUC {auc_before:.2f} -> {auc_after:.2f}"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss/alignment"] for r in records if "loss/alignment" in r]
    assert losses[-1] < losses[0]
    weights = [r for r in records if "weight/alignment" in r]
    assert all(abs(sum(r[f"weight/{t}"] for t in ("alignment", "contrastive")) - 1) < 1e-6 for r in weights)
    for name in (
        "best/config.json",
        "best/model.safetensors",
        "best/summary.json",
        "training.png",
        "last/optimizer.safetensors",
    ):
        assert (tmp_path / "run" / name).is_file(), name


def test_resume_continues_from_the_last_step(hm_slice, tmp_path) -> None:
    first = tiny_trainer(hm_slice, tmp_path / "run", max_steps=3)
    first.fit()
    resumed = tiny_trainer(hm_slice, tmp_path / "run", max_steps=5)
    assert resumed.load_state()
    assert resumed.step == 3
    for a, b in zip(first.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed.optimizer.state_dict()["state"].keys() == first.optimizer.state_dict()["state"].keys()
    resumed.fit()
    assert resumed.step == 5
    summary = json.loads((tmp_path / "run" / "best" / "summary.json").read_text())
    assert summary["steps"] in (3, 5)
    assert np.isfinite(summary["wall_time_s"])


def test_mined_neighbours_are_the_nearest_items_with_a_different_text() -> None:
    # Item 0's text points at image 1, then image 2; item 3 shares item 0's text, so it is never a negative.
    texts = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [1.0, 0.0]], np.float32)
    images = np.array([[0.0, 1.0], [0.9, 0.1], [0.7, 0.7], [1.0, 0.0]], np.float32)
    codes = np.array([0, 1, 2, 0])
    t2i, i2t = mine_neighbours(texts, images, codes, k=3)
    assert t2i[0].tolist() == [1, 2, -1]  # itself and its twin 3 left out: only two qualify
    assert t2i[1].tolist() == [0, 2, 3]  # item 3's text differs from item 1's
    # Image 1 ([0.9, 0.1]) is nearest the texts [1, 0] of items 0 and 3, then item 2's text.
    assert sorted(i2t[1][:2].tolist()) == [0, 3] and i2t[1][2] == 2


def test_mined_negatives_alternate_sides_and_come_from_the_pool() -> None:
    t2i = torch.tensor([[1, 2], [0, 2], [0, 1]])
    i2t = torch.tensor([[2, -1], [2, -1], [1, -1]])
    pairs = draw_mined_negatives(
        (t2i, i2t), [0, 1, 2], per_item=3, generator=torch.Generator().manual_seed(0)
    )
    assert len(pairs) == 9
    for row, text, image in pairs:
        item = [0, 1, 2][row]
        assert (text == item) != (image == item)  # exactly one side swapped
        if text == item:
            assert image in t2i[item].tolist()
        else:
            assert text in i2t[item][i2t[item] >= 0].tolist()
    swapped_images = sum(text == [0, 1, 2][row] for row, text, _ in pairs)
    assert swapped_images in (4, 5)  # sides alternate: 2 + 1 + 2 or 1 + 2 + 1 of the nine


def test_training_on_mined_negatives_runs_and_refreshes_the_pool(hm_slice, tmp_path) -> None:
    trainer = tiny_trainer(
        hm_slice, tmp_path / "run", max_steps=5, mine_top_k=8, mine_every=3, negatives_per_item=3
    )
    trainer.mine()
    losses = trainer.task_losses(list(range(16)), trainer.train_data)
    assert set(losses) == {"mlm", "mpm", "alignment", "contrastive"}
    assert all(torch.isfinite(v) for v in losses.values())
    trainer.neighbours = None
    trainer.fit()
    assert trainer.step == 5
    assert trainer.mined_at == 3  # mined at step 0, refreshed at step 3
    t2i, i2t = trainer.neighbours
    assert t2i.shape == i2t.shape == (len(trainer.train_data), 8)


def test_listwise_fine_tune_reads_unmasked_pairs_and_adds_a_ranking_term(
    hm_slice, tmp_path, monkeypatch
) -> None:
    import model.training as training

    options = dict(mine_top_k=8, negatives_per_item=4, tasks=("alignment", "contrastive"))
    binary, listwise = (
        tiny_trainer(hm_slice, tmp_path / name, listwise=name == "listwise", **options)
        for name in ("binary", "listwise")
    )

    def refuse(*args, **kwargs):
        raise AssertionError("pairs were masked although no reconstruction task is trained")

    monkeypatch.setattr(training, "mask_tokens", refuse)
    monkeypatch.setattr(training, "mask_patches", refuse)
    losses = {}
    for name, trainer in (("binary", binary), ("listwise", listwise)):
        trainer.model.eval()  # no dropout: both read the same pairs through the same weights
        trainer.mine()
        losses[name] = trainer.task_losses(list(range(16)), trainer.train_data)
    assert set(losses["listwise"]) == {"alignment", "contrastive"}
    # Same pairs, same binary term: the difference is the ranking term, a positive cross-entropy.
    extra = float((losses["listwise"]["alignment"] - losses["binary"]["alignment"]).detach())
    assert extra > 0.1
    assert float(losses["listwise"]["contrastive"].detach()) == pytest.approx(
        float(losses["binary"]["contrastive"].detach())
    )
    with pytest.raises(ValueError, match="mine_top_k"):
        TrainConfig(listwise=True)


def test_detached_tower_term_leaves_the_image_tower_to_the_contrastive_loss(hm_slice, tmp_path) -> None:
    """The image tower feeds alignment only through the tower cosine: detached, alignment cannot move it."""
    options = dict(mine_top_k=8, negatives_per_item=2, tasks=("alignment", "contrastive"), listwise=True)
    for detach in (False, True):
        trainer = tiny_trainer(hm_slice, tmp_path / str(detach), detach_tower_term=detach, **options)
        trainer.mine()
        losses = trainer.task_losses(list(range(16)), trainer.train_data)
        losses["alignment"].backward()
        grads = [p.grad for p in trainer.model.image_towers.parameters()]
        reached = any(g is not None and bool(g.abs().sum() > 0) for g in grads)
        assert reached != detach
        assert trainer.model.alignment_head.weight.grad.abs().sum() > 0  # the joint pass still trains


def test_head_alignment_adds_the_alignment_losses_of_the_head_alone(hm_slice, tmp_path) -> None:
    """--head-alignment adds the binary and listwise losses of the head's logit without the tower term:
    with tower_scale 0 that doubles the loss; with any other scale the added part stays the same."""
    options = dict(mine_top_k=8, negatives_per_item=2, tasks=("alignment", "contrastive"), listwise=True)
    loss = {}
    for scale in (0.0, 5.0):
        for head_alignment in (False, True):
            out = tmp_path / f"{scale}-{head_alignment}"
            trainer = tiny_trainer(hm_slice, out, head_alignment=head_alignment, **options)
            trainer.model.eval()  # no dropout: every trainer reads the same pairs through the same weights
            with torch.no_grad():
                trainer.model.tower_scale.fill_(scale)
            trainer.mine()
            losses = trainer.task_losses(list(range(16)), trainer.train_data)
            loss[scale, head_alignment] = float(losses["alignment"].detach())
    assert loss[0.0, True] == pytest.approx(2 * loss[0.0, False], rel=1e-4)
    assert loss[5.0, True] - loss[5.0, False] == pytest.approx(loss[0.0, False], rel=1e-3)
    assert loss[5.0, False] != pytest.approx(loss[0.0, False], rel=1e-3)  # the scale does move the sum


def test_weight_decay_reaches_matrices_only(hm_slice, tmp_path) -> None:
    """AdamW decays weight matrices, never biases or norms: not even the image towers', which are stacked
    into (members, dim) tensors and so have a matrix's rank."""
    trainer = tiny_trainer(hm_slice, tmp_path)
    decayed = {
        id(p)
        for group in trainer.optimizer.param_groups
        if group["weight_decay"] > 0
        for p in group["params"]
    }
    towers = trainer.model.image_towers.projection
    assert id(towers.weight1) in decayed and id(towers.weight2) in decayed
    assert not decayed & {id(p) for p in towers.vectors()}
    assert id(trainer.model.bert.embeddings.LayerNorm.weight) not in decayed
    assert id(trainer.model.bert.encoder.layer[0].attention.self.query.weight) in decayed


@pytest.mark.parametrize("scope", ["last_output", "last_layer", "encoder"])
def test_every_task_reaches_the_adaptive_losss_shared_parameters(hm_slice, tmp_path, scope) -> None:
    """The QP weighs tasks by their gradients on the scope: a task that never reached it would look
    gradient-free there and take the weights of tasks it does not compete with. Scopes nest, smallest
    (cheapest to reach) first."""
    trainer = tiny_trainer(hm_slice, tmp_path, adaptive_scope=scope)
    shared = trainer.loss.shared_parameters
    losses = trainer.task_losses(list(range(16)), trainer.train_data)
    assert set(losses) == {"mlm", "mpm", "alignment", "contrastive"}
    for name, loss in losses.items():
        grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
        norm = sum(float(g.float().norm()) for g in grads if g is not None)
        assert norm > 0, f"{name} does not reach the {scope} parameters"
    sizes = {s: len(adaptive_shared_parameters(trainer.model, s)) for s in ADAPTIVE_SCOPES}
    assert sizes["last_output"] < sizes["last_layer"] < sizes["encoder"]
    assert len(shared) == sizes[scope]


def test_an_unknown_adaptive_scope_is_refused() -> None:
    with pytest.raises(ValueError, match="adaptive_scope"):
        TrainConfig(adaptive_scope="heads")
