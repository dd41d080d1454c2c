"""Forgetting: zero-shot classification against an independent computation (prompt averaging,
chance for a model blind to the image), the readers and their one-line errors, the trainer's
per-epoch and test measurements, ``--max-zeroshot-drop`` with a planted drop, and WiSE-FT's ends
(alpha 0 is the starting model, alpha 1 the fine-tuned checkpoint, exactly)."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_study
from PIL import Image

from clipse.data.zeroshot import DEFAULT_TEMPLATES, load_zeroshot_set
from clipse.evaluation.encoding import ImageNormalizer, evaluate_split
from clipse.evaluation.zeroshot import (
    ZeroShotTensors,
    class_embeddings,
    evaluate_zeroshot,
    zeroshot_metrics,
)
from clipse.models import interpolate_weights
from clipse.report.wiseft import parse_alphas, wiseft_rows
from clipse.runs.folder import RunFolder, read_csv
from clipse.search.command import SearchOptions, run_search
from clipse.search.study import ZEROSHOT_CONSTRAINT, StudySettings, count_trials
from clipse.train import main as train_main
from clipse.training import PAUSE, train
from clipse.training.assembly import autocast_for, dataset_for, model_for, split_tensors
from clipse.util.errors import UserError

# ----------------------------------------------------------------------------------------------
# the metric


def reference_zeroshot(image_emb: np.ndarray, prompt_emb: np.ndarray, labels: np.ndarray, n_classes: int,
                       n_templates: int) -> tuple[float, float]:
    """CLIP_benchmark's protocol written out plainly in float64: normalise every prompt, average
    a class's prompts, normalise the average; the class of highest cosine wins."""
    images = image_emb / np.linalg.norm(image_emb, axis=1, keepdims=True)
    prompts = prompt_emb / np.linalg.norm(prompt_emb, axis=1, keepdims=True)
    classes = []
    for c in range(n_classes):
        mean = prompts[c * n_templates:(c + 1) * n_templates].sum(axis=0) / n_templates
        classes.append(mean / np.linalg.norm(mean))
    scores = images @ np.array(classes).T
    order = np.argsort(-scores, axis=1)
    top1 = np.mean(order[:, 0] == labels)
    top5 = np.mean([label in row[:5] for label, row in zip(labels, order)])
    return float(top1), float(top5)


def test_zeroshot_accuracy_matches_an_independent_computation():
    rng = np.random.default_rng(0)
    n_classes, n_templates, dim = 12, 4, 16
    prompt = rng.normal(size=(n_classes * n_templates, dim))
    labels = rng.integers(n_classes, size=300)
    centres = np.array([prompt[c * n_templates:(c + 1) * n_templates].mean(axis=0) for c in range(n_classes)])
    images = centres[labels] + rng.normal(scale=1.2, size=(300, dim))  # some right, some wrong
    expected = reference_zeroshot(images, prompt, labels, n_classes, n_templates)
    normalised = torch.nn.functional.normalize(torch.tensor(prompt, dtype=torch.float32), dim=1)
    got = zeroshot_metrics(torch.nn.functional.normalize(torch.tensor(images, dtype=torch.float32), dim=1),
                           class_embeddings(normalised, n_classes, n_templates), labels)
    assert 0.2 < expected[0] < 0.9 and expected[0] < expected[1] < 1.0  # a case where both can be wrong
    assert got == {"zs_top1": pytest.approx(expected[0], abs=1e-12), "zs_top5": pytest.approx(expected[1], abs=1e-12)}


def test_a_class_is_its_prompts_average_not_its_nearest_prompt():
    """Class A's prompts at +-40 degrees average to 0 degrees; class B's at 30 and 150 degrees to 90.
    An image at 0 degrees is nearest to one of B's prompts, yet it is A's by the protocol."""
    angle = np.radians
    prompts = torch.tensor([[np.cos(angle(a)), np.sin(angle(a))] for a in (40, -40, 30, 150)], dtype=torch.float32)
    classes = class_embeddings(prompts, 2, 2)
    assert torch.allclose(classes, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), atol=1e-6)
    image = torch.tensor([[1.0, 0.0]])
    assert int((image @ prompts.T).argmax()) == 2  # the nearest single prompt is B's
    assert zeroshot_metrics(image, classes, [0])["zs_top1"] == 1.0


class ImageBlindModel(torch.nn.Module):
    """Embeds every image alike; texts by the mean of their token embeddings."""

    def __init__(self):
        super().__init__()
        self.tokens = torch.nn.Embedding(50000, 8)

    def encode_image(self, images, normalize=True):
        return torch.nn.functional.normalize(torch.ones(len(images), 8), dim=1)

    def encode_text(self, tokens, normalize=True):
        return torch.nn.functional.normalize(self.tokens(tokens).mean(dim=1), dim=1)


class CollapsedModel(ImageBlindModel):
    """Embeds every image and every text alike: all classes tie for every image."""

    def encode_text(self, tokens, normalize=True):
        return torch.nn.functional.normalize(torch.ones(len(tokens), 8), dim=1)


def test_a_collapsed_model_scores_chance_on_unbalanced_classes():
    """Ties, not the balance of the labels, give chance: 7 of 8 images are of class 0."""
    scores_tied = zeroshot_metrics(torch.ones(8, 4) / 2, torch.ones(6, 4) / 2, [0] * 7 + [3])
    assert scores_tied == {"zs_top1": pytest.approx(1 / 6), "zs_top5": pytest.approx(5 / 6)}


@pytest.mark.parametrize("model", [ImageBlindModel, CollapsedModel])
def test_a_model_that_ignores_the_image_scores_chance(model):
    torch.manual_seed(0)
    n_classes, n_templates = 10, 3
    tensors = ZeroShotTensors(images=torch.zeros(40, 3, 8, 8, dtype=torch.uint8),
                              labels=torch.arange(40) % n_classes,
                              prompt_tokens=torch.randint(1, 50000, (n_classes * n_templates, 6)),
                              n_classes=n_classes, n_templates=n_templates)
    metrics = evaluate_zeroshot(model(), tensors, ImageNormalizer((0, 0, 0), (1, 1, 1), torch.device("cpu")),
                                autocast_for(torch.device("cpu")))
    # blind to the image: one class wins for all, a tenth of the balanced labels; collapsed: all
    # classes tie for every image, and a random order of the ties is right a tenth of the time
    assert metrics == {"zs_top1": pytest.approx(1 / n_classes), "zs_top5": pytest.approx(5 / n_classes)}


# ----------------------------------------------------------------------------------------------
# the sets and their errors


def _image(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)


def test_a_class_folder_and_a_label_csv_give_the_same_set(tmp_path):
    for name, colour in (("red_square", "red"), ("blue_circle", "blue")):
        for i in range(2):
            _image(tmp_path / "folders" / name / f"{i}.png", colour)
    rows = [("images/a.png", "red square"), ("images/b.png", "blue circle"), ("images/c.png", "red square")]
    for file, label in rows:
        _image(tmp_path / "csv" / file, "red" if "red" in label else "blue")
    with open(tmp_path / "csv" / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("filepath", "label"), *rows])
    (tmp_path / "templates.txt").write_text("a {}\n\nthe {} here\n")
    folders = load_zeroshot_set(str(tmp_path / "folders"), str(tmp_path / "templates.txt"))
    table = load_zeroshot_set(str(tmp_path / "csv" / "labels.csv"))
    assert folders.classes == table.classes == ["blue circle", "red square"]
    assert folders.labels == [0, 0, 1, 1] and table.labels == [0, 1, 1]
    assert [p.name for p in table.image_paths] == ["b.png", "a.png", "c.png"]
    assert folders.templates == ("a {}", "the {} here") and table.templates == DEFAULT_TEMPLATES
    assert folders.prompts() == ["a blue circle", "the blue circle here", "a red square", "the red square here"]


def _bad_inputs(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    _image(tmp_path / "empty" / "dog" / "1.png", "white")
    _image(tmp_path / "csv" / "1.png", "white")
    (tmp_path / "csv" / "labels.csv").write_text("filepath,label\n1.png,dog\n,cat\n")
    (tmp_path / "no-braces.txt").write_text("a photo\n")
    return {
        "empty class folder": (["--zeroshot", str(tmp_path / "empty")], "class folder has no images"),
        "label with no images": (["--zeroshot", str(tmp_path / "csv" / "labels.csv")], "label 'cat' with no image"),
        "missing templates file": (["--zeroshot-templates", str(tmp_path / "nope.txt")], "file not found"),
        "template without {}": (["--zeroshot-templates", str(tmp_path / "no-braces.txt")], "with {} for the class"),
        "missing set": (["--zeroshot", str(tmp_path / "nowhere")], "zero-shot set not found"),
    }


def test_bad_zeroshot_inputs_end_in_one_line_before_anything_is_written(tmp_path, capsys):
    for case, (flags, message) in _bad_inputs(tmp_path).items():
        run_dir = tmp_path / "runs" / case.replace(" ", "-")
        code = train_main(["--pretrained", "none", "--shapes-train-images", "8", "--data-root",
                           str(tmp_path / "shapes"), "--run-dir", str(run_dir), *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, case
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (case, err)
        assert not run_dir.exists(), case


# ----------------------------------------------------------------------------------------------
# the trainer


def test_the_trainer_measures_the_start_every_k_epochs_the_last_and_the_test_checkpoint(tiny):
    config = tiny(epochs=3, zeroshot_every=2, eval_test=True)
    result = train(config)
    rows = RunFolder(config.run_dir).epoch_rows()
    measured = [math.isfinite(float(row["val_zs_top1"])) for row in rows]
    assert measured == [False, True, True]  # epoch 2 (every 2) and the last
    assert set(result.start_metrics) == {"zs_top1", "zs_top5"} and 0 <= result.start_metrics["zs_top1"] <= 1
    assert 0 <= result.test_metrics["test_zs_top1"] <= result.test_metrics["test_zs_top5"] <= 1
    # zero-shot evaluation changes nothing the run trains
    plain = train(tiny(epochs=3, zeroshot="none", run_dir=str(config.run_dir) + "-plain"))
    assert plain.start_metrics == {} and "val_zs_top1" not in plain.best_metrics
    losses = [r["loss"] for r in read_csv(RunFolder(config.run_dir).training_csv)]
    assert losses == [r["loss"] for r in read_csv(RunFolder(plain.run_dir).training_csv)]


def test_a_resumed_run_keeps_its_start_measurement(tiny, monkeypatch):
    """Measured once, before the first epoch: the resumed run takes it from its checkpoint (a
    search resumes the seeds of a trial after every epoch) and measures only its epochs."""
    import clipse.training.trainer as trainer

    calls = []
    measure = trainer.evaluate_zeroshot
    monkeypatch.setattr(trainer, "evaluate_zeroshot", lambda *args: calls.append(1) or measure(*args))
    config = tiny(epochs=2)
    paused = train(config, [lambda report: PAUSE])
    assert paused.status == "paused" and len(calls) == 2  # the start and epoch 1
    resumed = train(config.replace(resume=True))
    assert resumed.status == "completed" and len(calls) == 3  # epoch 2 only
    assert resumed.start_metrics == paused.start_metrics == RunFolder(config.run_dir).result().start_metrics


# ----------------------------------------------------------------------------------------------
# --max-zeroshot-drop


def test_the_constraint_is_the_drop_in_points_beyond_the_maximum():
    settings = StudySettings(space="s", space_digest="", space_definition={}, max_zeroshot_drop=5.0)
    assert settings.zeroshot_excess(0.60, 0.58) == pytest.approx(-3.0)
    assert settings.zeroshot_excess(0.60, 0.40) == pytest.approx(15.0)
    assert settings.zeroshot_excess(0.60, 0.70) == pytest.approx(-15.0)  # gaining is feasible
    assert settings.zeroshot_excess(0.60, float("nan")) == 100.0  # measured nothing: infeasible
    assert StudySettings(space="s", space_digest="", space_definition={}, max_zeroshot_drop=100.0).zeroshot_excess(
        None, 0.5) > 0


@pytest.mark.slow
def test_a_planted_drop_makes_its_trial_infeasible(tmp_path, monkeypatch, capsys):
    """Two trials, inline; the planted zero-shot accuracies are: the start 60%, then 59% and 58%
    for the first trial (at most 2 points lost) and 40% and 45% for the second (15 or more)."""
    planted = iter([0.60, 0.59, 0.58, 0.60, 0.40, 0.45])
    monkeypatch.setattr("clipse.training.trainer.evaluate_zeroshot",
                        lambda *args: {"zs_top1": next(planted), "zs_top5": 1.0})
    training = {"pretrained": "none", "shapes_train_images": 48, "shapes_val_images": 12, "shapes_test_images": 12,
                "batch_size": 16, "epochs": 2, "data_root": str(tmp_path / "shapes")}
    result = run_search(SearchOptions(space="baseline", trials=2, pruner="none", sampler="random",
                                      studies_dir=tmp_path / "studies", max_zeroshot_drop=5.0, training=training))
    assert "max zero-shot drop 5 points" in capsys.readouterr().err
    first, second = load_study(tmp_path, "baseline").get_trials()
    for trial in (first, second):
        drop = 100 * (trial.user_attrs["start_zs_top1"] - trial.user_attrs["val_zs_top1"])
        assert trial.constraints[ZEROSHOT_CONSTRAINT] == pytest.approx(drop - 5.0)
    assert first.constraints[ZEROSHOT_CONSTRAINT] <= 0 < second.constraints[ZEROSHOT_CONSTRAINT]
    assert result.counts.infeasible == 1 and result.counts.best_number == first.number
    assert count_trials(load_study(tmp_path, "baseline")).best_number == first.number


def test_zeroshot_in_a_search_needs_a_set_measured_every_epoch(tmp_path):
    base = {"pretrained": "none", "shapes_train_images": 8, "data_root": str(tmp_path / "shapes")}
    cases = [({"zeroshot": "none"}, {"max_zeroshot_drop": 5.0}, "--max-zeroshot-drop 5: needs a zero-shot set"),
             ({"zeroshot_every": 2}, {"metric": "val_r1_mean,val_zs_top1"}, "needs zero-shot accuracy at every epoch"),
             ({}, {"max_zeroshot_drop": 150.0}, "points of top-1 accuracy, from 0 to 100"),
             ({"zeroshot": str(tmp_path / "nowhere")}, {}, "zero-shot set not found")]
    for training, study, message in cases:
        with pytest.raises(UserError, match=message):
            run_search(SearchOptions(space="baseline", trials=1, studies_dir=tmp_path / "studies",
                                     training={**base, **training}, **study))
    journal = tmp_path / "studies" / "baseline" / "journal.log"
    assert not journal.exists() or journal.stat().st_size == 0  # no study was created


# ----------------------------------------------------------------------------------------------
# WiSE-FT


def test_interpolated_weights_are_the_mix_and_exact_at_the_ends():
    torch.manual_seed(0)
    start = {"w": torch.randn(50, 7), "count": torch.tensor(3)}
    tuned = {"w": torch.randn(50, 7), "count": torch.tensor(9)}
    for alpha in (0.0, 0.3, 0.75, 1.0):
        mixed = interpolate_weights(start, tuned, alpha)
        assert torch.allclose(mixed["w"], (1 - alpha) * start["w"] + alpha * tuned["w"], atol=1e-6)
        assert int(mixed["count"]) == 9
    assert torch.equal(interpolate_weights(start, tuned, 0.0)["w"], start["w"])
    assert torch.equal(interpolate_weights(start, tuned, 1.0)["w"], tuned["w"])
    with pytest.raises(ValueError, match="different tensors"):
        interpolate_weights(start, {"w": tuned["w"]}, 0.5)
    assert parse_alphas("1, 0,0.5") == (0.0, 0.5, 1.0) and parse_alphas("none") == ()
    for bad in ("0,1.5", "half"):
        with pytest.raises(UserError, match="--wiseft-alphas"):
            parse_alphas(bad)


@pytest.mark.parametrize("loss", ["infonce", "siglip"])
def test_wiseft_alpha_0_is_the_start_and_alpha_1_the_fine_tuned_checkpoint(tiny, loss, monkeypatch):
    config = tiny(epochs=2, eval_test=True, loss=loss, lr=3e-3)
    result = train(config)
    rows = {row["alpha"]: row for row in wiseft_rows(result.run_dir, (0.0, 0.5, 1.0))}
    tuned = {key.removeprefix("test_"): value for key, value in result.test_metrics.items()}
    assert {key: rows[1.0][key] for key in tuned} == tuned  # exactly
    torch.manual_seed(config.seed)
    loaded = model_for(config)
    start, _ = evaluate_split(loaded.model, split_tensors(dataset_for(config), "test", loaded),
                              ImageNormalizer(loaded.mean, loaded.std, torch.device("cpu")),
                              autocast_for(torch.device("cpu")))
    assert {key: rows[0.0][key] for key in start} == start
    assert rows[0.0]["zs_top1"] == result.start_metrics["zs_top1"]
    assert rows[0.5]["r1_mean"] not in (rows[0.0]["r1_mean"], rows[1.0]["r1_mean"]) or \
        rows[0.5]["i2t_mr"] not in (rows[0.0]["i2t_mr"], rows[1.0]["i2t_mr"])  # a mix, not an end
    with monkeypatch.context() as patched:  # kept and reused: nothing is evaluated again
        patched.setattr("clipse.report.wiseft.evaluate_split", lambda *args: pytest.fail("evaluated again"))
        assert wiseft_rows(result.run_dir, (0.0, 0.5, 1.0)) == list(rows.values())
    Path(result.run_dir, "best.pt").touch()  # a retrained checkpoint: measured again
    assert wiseft_rows(result.run_dir, (0.0, 0.5, 1.0)) == list(rows.values())


def test_two_class_folders_of_one_name_and_hidden_folders(tmp_path):
    _image(tmp_path / "a" / "red_circle" / "1.png", "red")
    _image(tmp_path / "a" / "red circle" / "1.png", "red")
    with pytest.raises(UserError, match="both the class 'red circle'"):
        load_zeroshot_set(str(tmp_path / "a"))
    _image(tmp_path / "b" / "red_circle" / "1.png", "red")
    (tmp_path / "b" / ".ipynb_checkpoints").mkdir()
    assert load_zeroshot_set(str(tmp_path / "b")).classes == ["red circle"]
