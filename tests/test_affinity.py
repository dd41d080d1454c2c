"""Where SANW's affinity comes from (``--affinity``) and the embedded pretrained model: the frozen
teacher stays the starting model, the EMA teacher follows its formula and survives a resume,
the oracle weighs exactly the true false negatives down, and a build is deterministic."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from clipse.config import TrainConfig
from clipse.data import ShapesSpec, load_caption_dataset
from clipse.evaluation.encoding import ImageNormalizer, encode_split
from clipse.losses import LOSSES, Reference
from clipse.losses.base import false_negative_stats
from clipse.runs.folder import RunFolder
from clipse.training import PAUSE, train
from clipse.training import trainer as trainer_module
from clipse.training.affinity import EmaTeacher, GroundTruth, true_false_negatives
from clipse.training.assembly import model_for, split_tensors
from clipse.training.embedded import PretrainingRecipe, ensure_built
from clipse.util.checkpoints import read_checkpoint


def test_the_ema_update_is_its_formula_exactly():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    teacher = EmaTeacher(student, decay=0.9)
    start = [p.detach().clone() for p in teacher.model.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    teacher.after_step(student)
    for before, now, current in zip(start, teacher.model.parameters(), student.parameters()):
        assert torch.equal(now, before * 0.9 + current.detach() * (1 - 0.9))
        assert not now.requires_grad


def test_the_frozen_teacher_is_the_starting_model_after_training(tiny, monkeypatch):
    captured = []
    original = trainer_module.affinity_source
    monkeypatch.setattr(trainer_module, "affinity_source", lambda *a, **k: captured.append(original(*a, **k))
                        or captured[-1])
    config = tiny(loss="sanw_debias", alpha=0.5, affinity="frozen", epochs=2)
    train(config)
    teacher = captured[0]
    # the starting model, rebuilt the same way (seeded random init), encodes the split as the teacher did
    torch.manual_seed(config.seed)
    loaded = model_for(config)
    split = split_tensors(load_caption_dataset("shapes", config.data_root, shapes=ShapesSpec(48, 12, 12)), "train",
                          loaded)
    images, texts = encode_split(loaded.model, split, ImageNormalizer(loaded.mean, loaded.std, torch.device("cpu")),
                                 lambda: torch.autocast("cpu", enabled=False))
    assert torch.equal(teacher.images, images) and torch.equal(teacher.texts, texts)
    assert not teacher.images.requires_grad and not teacher.texts.requires_grad
    trained = read_checkpoint(Path(config.run_dir) / "last.pt", "cpu")["state_dict"]
    assert not torch.equal(trained["logit_scale"], loaded.model.state_dict()["logit_scale"]) or any(
        not torch.equal(trained[k], v) for k, v in loaded.model.state_dict().items())  # the model itself moved


def test_a_resumed_run_continues_the_same_ema_teacher(tiny, tmp_path):
    whole = tiny(loss="sanw_debias", alpha=0.5, affinity="ema", ema_decay=0.9, epochs=2)
    train(whole)
    paused = tiny(loss="sanw_debias", alpha=0.5, affinity="ema", ema_decay=0.9, epochs=2,
                  run_dir=str(tmp_path / "paused"))
    assert train(paused, [lambda report: PAUSE]).status == "paused"
    train(paused.replace(resume=True))
    a = read_checkpoint(Path(whole.run_dir) / "last.pt", "cpu")["affinity_source"]["model"]
    b = read_checkpoint(Path(paused.run_dir) / "last.pt", "cpu")["affinity_source"]["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert RunFolder(whole.run_dir).epoch_rows()[-1]["train_loss"] == RunFolder(paused.run_dir).epoch_rows()[-1]["train_loss"]


def test_the_oracle_weighs_exactly_the_true_false_negatives_down(tiny):
    config = tiny()
    loaded = model_for(config.replace(pretrained="none"))
    dataset = load_caption_dataset("shapes", config.data_root, shapes=ShapesSpec(48, 12, 12, fn_level="high"))
    split = split_tensors(dataset, "train", loaded)
    pairs = np.random.default_rng(0).permutation(len(split.tokens))[:64]
    reference = GroundTruth(split, torch.device("cpu")).reference(pairs, None, None, None)
    loss = LOSSES["sanw_debias"](alpha=0.9, delta=0.5, lam=20.0)
    emb = torch.nn.functional.normalize(torch.randn(64, 8), dim=1)
    weights = loss.negative_weights(emb, emb, reference)
    truth = true_false_negatives(split, pairs, torch.device("cpu"))
    off = ~torch.eye(64, dtype=torch.bool)
    either = (truth | truth.T) & off
    assert either.any() and torch.equal((weights < 0.9) & off, either)
    stats = false_negative_stats(weights, truth)
    assert stats["fn_recall"] == 1.0 and 0 < stats["fn_precision"] < 1  # precision counts both directions


def test_a_reference_replaces_the_embeddings_as_the_source_of_the_affinity():
    torch.manual_seed(1)
    emb = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    teacher = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    loss = LOSSES["sanw_debias"](alpha=0.5, delta=0.2, lam=5.0)
    from_teacher = loss.negative_weights(emb, emb, Reference(image=teacher, text=teacher))
    assert torch.equal(from_teacher, loss.negative_weights(teacher, teacher))
    assert not torch.equal(from_teacher, loss.negative_weights(emb, emb))


@pytest.mark.slow
def test_two_builds_of_the_embedded_model_are_identical(tmp_path, monkeypatch):
    recipe = PretrainingRecipe(images=40, val_images=10, epochs=1, batch_size=16)
    built = []
    for name in ("a", "b"):
        monkeypatch.setenv("CLIPSE_CACHE", str(tmp_path / name))
        built.append(read_checkpoint(ensure_built("shapes-pretrained", train, recipe), "cpu"))
    a, b = (state["state_dict"] for state in built)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert built[0]["key"] == recipe.key and built[0]["recipe"] == dataclasses.asdict(recipe)
    assert recipe.key != PretrainingRecipe().key  # another recipe, another file
    assert TrainConfig().pretrained == "shapes-pretrained"  # what the default fine-tunes
