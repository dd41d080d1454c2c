"""The known-answer benchmark's parts: the synthetic data's ground truth (checked against the
captions' own words), the false-negative levels, the multi-positive metrics and the
false-negative statistics (each against a plain-loop reference), and the trainer logging them."""

import re

import numpy as np
import pandas as pd
import pytest
import torch

import clipse.evaluation.metrics
from clipse.data import ShapesSpec, load_caption_dataset, synthetic
from clipse.data.formats.shapes import ensure_shapes_dataset
from clipse.data.sampling import random_batches
from clipse.data.synthetic import SHAPES_FN_LEVELS, strip_prefix
from clipse.data.truth import CaptionTruth
from clipse.evaluation.metrics import (
    MP_METRIC_KEYS,
    metrics_from_ranks,
    resampled_metrics,
    retrieval_ranks,
)
from clipse.losses import LOSSES
from clipse.losses.base import false_negative_stats
from clipse.training.trainer import train

SHAPE = r"(small|large) (\w+) (\w+) at the ([\w ]+?)"
COMPLETE_ONE = re.compile(rf"^a single {SHAPE} of a (\w+) picture$")
COMPLETE_TWO = re.compile(rf"^a {SHAPE} and a {SHAPE}, on a (\w+) background$")
PLACED = re.compile(rf"^an? {SHAPE} on a (\w+) background$")
ON_BACKGROUND = re.compile(r"^an? (\w+) (\w+) on a (\w+) background$")
SIZED = re.compile(r"^an? (small|large) (\w+) (\w+)$")
COARSE = re.compile(r"^an? (\w+) (\w+)$")
BACKGROUND = re.compile(r"^a (\w+) background$")


def scene_from_complete_caption(text: str) -> tuple[frozenset, str]:
    """An image's shapes (size, colour, kind, place) and background, read from its complete caption."""
    match = COMPLETE_ONE.match(text) or COMPLETE_TWO.match(text)
    groups = match.groups()
    return frozenset(groups[i:i + 4] for i in range(0, len(groups) - 1, 4)), groups[-1]


def caption_describes(caption: str, shapes: frozenset, background: str) -> bool:
    """The reference: what the caption's words claim, checked against the image's description."""
    for pattern in (COMPLETE_ONE, COMPLETE_TWO):
        if pattern.match(caption):
            return scene_from_complete_caption(caption) == (shapes, background)
    text = strip_prefix(caption)
    if match := PLACED.match(text):
        return match.groups()[:4] in shapes and match.group(5) == background
    if match := ON_BACKGROUND.match(text):
        return any(s[1:3] == match.groups()[:2] for s in shapes) and match.group(3) == background
    if match := BACKGROUND.match(text):
        return match.group(1) == background
    if match := SIZED.match(text):
        return any(s[:3] == match.groups() for s in shapes)
    match = COARSE.match(text)
    assert match, caption
    return any(s[1:3] == match.groups() for s in shapes)


@pytest.mark.parametrize("level", SHAPES_FN_LEVELS)
def test_the_ground_truth_is_what_the_captions_say(tmp_path, level):
    spec = ShapesSpec(40, 10, 10, seed=3, fn_level=level)
    dataset = load_caption_dataset("shapes", tmp_path / level, shapes=spec)
    split = dataset.split("train")
    by_image = {}
    for text, row in zip(split.captions, split.caption_image):
        by_image.setdefault(int(row), []).append(text)
    scenes = {row: scene_from_complete_caption(next(t for t in texts if COMPLETE_ONE.match(t) or COMPLETE_TWO.match(t)))
              for row, texts in by_image.items()}
    expected = torch.tensor([[caption_describes(text, *scenes[n]) for n in range(len(split.image_paths))]
                             for text in split.captions])
    truth = dataset.truth("train").describes()
    assert torch.equal(truth, expected)
    assert truth[torch.arange(len(split.captions)), torch.as_tensor(split.caption_image)].all()
    if level != "low":  # some captions describe other images too (low: too rare among 40 images)
        assert expected.sum() > len(split.captions)


def test_levels_change_the_captions_not_the_images_and_order_the_false_negatives(tmp_path):
    shares, images = {}, {}
    for level in SHAPES_FN_LEVELS:
        spec = ShapesSpec(120, 5, 5, fn_level=level)
        folder = ensure_shapes_dataset(spec, tmp_path / level)
        images[level] = [p.read_bytes() for p in sorted((folder / "Flicker8k_Dataset").iterdir())]
        truth = load_caption_dataset("shapes", folder, shapes=spec).truth("train").describes()
        shares[level] = truth.float().mean().item()
    assert images["low"] == images["default"] == images["high"]
    assert shares["low"] < shares["default"] < shares["high"]
    assert ShapesSpec(1200, 500, 1000).folder_name == "shapes-v1-s0-1200-500-1000"  # the default level: no suffix
    assert ShapesSpec(1200, 500, 1000, fn_level="high").folder_name == "shapes-v1-s0-1200-500-1000-fnhigh"


def test_the_ground_truth_is_computed_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPSE_CACHE", str(tmp_path / "cache"))
    dataset = load_caption_dataset("shapes", tmp_path / "data", shapes=ShapesSpec(30, 5, 5, seed=4, fn_level="high"))
    first = dataset.truth("train")
    assert len(list((tmp_path / "cache" / "tensors").glob("truth-*"))) == 1
    scenes = []
    generate = synthetic._scene
    monkeypatch.setattr(synthetic, "_scene", lambda *args: scenes.append(args) or generate(*args))
    again = dataset.truth("train")
    assert scenes == []  # nothing regenerated
    recomputed = synthetic._shapes_truth(dataset.split("train"), 4, "high", "default")
    assert len(scenes) == 30  # (the patched generator is the one that computes)
    for truth in (first, again):
        assert torch.equal(truth.image_facts, recomputed.image_facts)
        assert torch.equal(truth.caption_facts, recomputed.caption_facts)
    dataset.truth("val")
    assert len(list((tmp_path / "cache" / "tensors").glob("truth-*"))) == 2  # another split, another entry


def test_caption_truth_equals_a_plain_loop_over_facts():
    rng = np.random.default_rng(0)
    vocabulary = [f"f{i}" for i in range(12)]
    images = [set(rng.choice(vocabulary, rng.integers(0, 6), replace=False)) for _ in range(9)]
    captions = [set(rng.choice(vocabulary, rng.integers(0, 3), replace=False)) for _ in range(14)]
    truth = CaptionTruth.from_facts(images, captions)
    expected = torch.tensor([[c <= i for i in images] for c in captions])
    assert torch.equal(truth.describes(), expected)
    rows, cols = torch.tensor([3, 0, 3, 13]), torch.tensor([8, 1, 1])
    assert torch.equal(truth.describes(rows, cols), expected[rows][:, cols])


# ----------------------------------------------------------------------------------------------
# multi-positive metrics


def reference_multi_positive(scores: np.ndarray, relevant: np.ndarray) -> dict[str, float]:
    """Plain loops: a query hits at k when a truly relevant candidate is among its k best
    (1 + the number of candidates scored strictly higher than the best relevant one)."""
    n_images, n_captions = scores.shape
    out = {}
    for k in (1, 5, 10):
        hits = []
        for i in range(n_images):
            best = max(scores[i, c] for c in range(n_captions) if relevant[c, i])
            hits.append(1 + sum(scores[i, c] > best for c in range(n_captions)) <= k)
        out[f"mp_i2t_r{k}"] = float(np.mean(hits))
        hits = []
        for c in range(n_captions):
            best = max(scores[i, c] for i in range(n_images) if relevant[c, i])
            hits.append(1 + sum(scores[i, c] > best for i in range(n_images)) <= k)
        out[f"mp_t2i_r{k}"] = float(np.mean(hits))
    return out


def test_multi_positive_metrics_on_a_case_worked_by_hand():
    """3 images, 4 captions; caption 3 ("a red circle") truly describes images 0 and 2."""
    images = torch.eye(3)
    texts = torch.tensor([[0.1, 0.9, 0.0],   # caption 0 of image 0, closest to image 1
                          [0.0, 1.0, 0.0],   # caption 1 of image 1
                          [0.0, 0.0, 1.0],   # caption 2 of image 2
                          [0.9, 0.0, 0.2]])  # caption 3 of image 2, closest to image 0, which it also describes
    owner = [0, 1, 2, 2]
    relevant = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1]], dtype=torch.bool)
    metrics = metrics_from_ranks(retrieval_ranks(images, texts, owner, relevant))
    assert metrics["t2i_r1"] == 0.5            # captions 1 and 2 find their own image first
    assert metrics["mp_t2i_r1"] == 0.75        # caption 3's first image (0) is one it describes
    assert metrics["i2t_r1"] == pytest.approx(2 / 3)  # image 0's best caption is caption 3, not its own
    assert metrics["mp_i2t_r1"] == 1.0         # ... which truly describes it
    assert set(MP_METRIC_KEYS) <= set(metrics)


@pytest.mark.parametrize("row_block", [256, 5], ids=["one block", "several blocks"])
def test_multi_positive_metrics_equal_a_plain_loop_with_shared_captions(monkeypatch, row_block):
    monkeypatch.setattr(clipse.evaluation.metrics, "_ROW_BLOCK", row_block)  # rows are ranked in blocks of this many
    rng = np.random.default_rng(5)
    n_images, owner = 12, np.repeat(np.arange(12), 3)
    relevant = rng.random((len(owner), n_images)) < 0.15
    relevant[np.arange(len(owner)), owner] = True      # every caption describes its own image
    images = torch.nn.functional.normalize(torch.tensor(rng.normal(size=(n_images, 6)), dtype=torch.float32), dim=1)
    texts = torch.nn.functional.normalize(images[owner] + torch.tensor(rng.normal(size=(len(owner), 6)),
                                                                       dtype=torch.float32), dim=1)
    ranks = retrieval_ranks(images, texts, owner, torch.as_tensor(relevant))
    got = metrics_from_ranks(ranks)
    expected = reference_multi_positive((images @ texts.T).numpy(), relevant)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert all(got[f"mp_{d}_r1"] >= got[f"{d}_r1"] for d in ("i2t", "t2i"))
    counts = rng.multinomial(n_images, np.full(n_images, 1 / n_images), size=4)
    many = resampled_metrics(ranks, counts)
    for r in range(4):
        one = metrics_from_ranks(ranks, counts[r])
        for key in MP_METRIC_KEYS:
            assert many[key][r] == pytest.approx(one[key], abs=1e-12), key
    with pytest.raises(ValueError, match="relevant must hold every caption's own image"):
        retrieval_ranks(images, texts, owner, torch.zeros(len(owner), n_images, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# false-negative statistics


def test_false_negative_statistics_on_a_hand_made_batch():
    weights = torch.tensor([[1.0, 0.5, 1.2, 0.8],
                            [0.95, 1.0, 0.7, 1.1],
                            [1.0, 1.0, 1.0, 1.0],
                            [0.85, 0.6, 1.0, 1.0]])
    truth = torch.tensor([[1, 1, 0, 0],
                          [0, 1, 1, 0],
                          [0, 0, 1, 1],
                          [1, 0, 0, 1]], dtype=torch.bool)  # the diagonal is never counted
    stats = false_negative_stats(weights, truth)
    # off-diagonal: true FN (0,1) (1,2) (2,3) (3,0); suppressed (< 0.9): (0,1) (0,3) (1,2) (3,0) (3,1).
    # w[i, j] weighs image i's caption j (true: truth[i, j]) and caption i's image j (true: truth[j, i]):
    # image->text catches (0,1) (1,2) (3,0); text->image, true at (1,0) (2,1) (3,2) (0,3), catches (0,3).
    assert stats["fn_share"].item() == pytest.approx(4 / 12)
    assert stats["fn_recall"].item() == pytest.approx((3 + 1) / (2 * 4))
    assert stats["fn_precision"].item() == pytest.approx((3 + 1) / (2 * 5))
    flat = false_negative_stats(torch.ones(4, 4), truth)
    assert flat["fn_recall"].item() == 0 and np.isnan(flat["fn_precision"].item())
    none = false_negative_stats(weights, torch.eye(4, dtype=torch.bool))
    assert none["fn_share"].item() == 0 and np.isnan(none["fn_recall"].item())


@pytest.mark.parametrize("name", ["infonce", "sanw_debias", "sanw_bandpass"])
def test_a_loss_reports_the_statistics_of_the_weights_it_trains_with(name):
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    text = torch.nn.functional.normalize(image + 0.5 * torch.randn(16, 8), dim=1)
    truth = torch.rand(16, 16) < 0.3
    loss = LOSSES[name](**({"alpha": 0.6} if name != "infonce" else {}))
    value, stats = loss.compute(image, text, torch.tensor(20.0), false_negatives=truth)
    weights = loss.negative_weights(image, text)
    assert stats["weight_std"].item() == pytest.approx(weights[~torch.eye(16, dtype=torch.bool)].std(
        unbiased=False).item(), abs=1e-6)
    for key, expected in false_negative_stats(weights, truth).items():
        assert stats[key].item() == pytest.approx(expected.item(), nan_ok=True), key
    plain_value, plain_stats = loss.compute(image, text, torch.tensor(20.0))
    assert torch.equal(value, plain_value) and "fn_share" not in plain_stats


def test_training_logs_the_false_negatives_of_its_batches(tiny):
    config = tiny(loss="sanw_debias", alpha=0.6, shapes_fn_level="high", log_every=1, epochs=1, eval_test=True)
    result = train(config)
    steps = pd.read_csv(f"{config.run_dir}/training.csv")
    dataset = load_caption_dataset("shapes", config.data_root, shapes=ShapesSpec(
        config.shapes_train_images, config.shapes_val_images, config.shapes_test_images, config.data_seed, "high"))
    split, truth = dataset.split("train"), dataset.truth("train")
    batch = torch.from_numpy(random_batches(len(split.captions), config.batch_size, config.seed, 0)[0])
    mask = truth.describes(batch, torch.as_tensor(split.caption_image)[batch])
    off = ~torch.eye(len(batch), dtype=torch.bool)
    assert steps["fn_share"].iloc[0] == pytest.approx(mask[off].float().mean().item())
    assert steps["fn_share"].between(0, 1).all() and steps["fn_recall"].between(0, 1).all()
    assert set(f"val_{k}" for k in MP_METRIC_KEYS) <= set(result.best_metrics)
    assert set(f"test_{k}" for k in MP_METRIC_KEYS) <= set(result.test_metrics)
