"""Precision, torch.compile, gradient checkpointing, augmentation and the pinned batch path."""

import csv
from pathlib import Path

import pytest
import torch

from clipse.evaluation.encoding import ImageNormalizer
from clipse.train import main as train_main
from clipse.training.batches import TrainingBatches, augment_batch
from clipse.training.distributed import Ranks
from clipse.training.trainer import train


def step_losses(result) -> list[float]:
    with open(Path(result.run_dir) / "training.csv", newline="") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def run(tiny, name, **changes):
    config = tiny(epochs=1, log_every=1, **changes)
    return train(config.replace(run_dir=str(Path(config.run_dir).parent / name)))


def test_amp_fp16_on_the_cpu_is_one_line_before_anything_is_written(tmp_path, capsys):
    code = train_main(["--precision", "amp_fp16", "--device", "cpu", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--precision amp_fp16 needs CUDA" in err[0]
    assert not (tmp_path / "run").exists()


def test_precision_on_the_cpu(tiny):
    fp32, auto, bf16 = (run(tiny, name, precision=name) for name in ("fp32", "auto", "amp_bf16"))
    assert step_losses(fp32) == step_losses(auto)  # auto is fp32 on the CPU
    assert all(torch.isfinite(torch.tensor(step_losses(bf16))))
    assert step_losses(bf16) != step_losses(fp32)  # bf16 autocast did run
    assert step_losses(bf16)[:3] == pytest.approx(step_losses(fp32)[:3], rel=0.02)  # then they drift apart


def test_gradient_checkpointing_is_switched_on_in_both_towers(tiny):
    from clipse.training.assembly import model_for, prepare_model

    config = tiny(grad_checkpointing=True)
    model = prepare_model(model_for(config).model, config)
    assert model.visual.transformer.grad_checkpointing and model.transformer.grad_checkpointing
    assert not model_for(config).model.visual.transformer.grad_checkpointing


def test_gradient_checkpointing_computes_the_same_steps(tiny):
    plain, checkpointed = run(tiny, "plain"), run(tiny, "checkpointed", grad_checkpointing=True)
    assert step_losses(checkpointed) == pytest.approx(step_losses(plain), rel=1e-5)
    assert checkpointed.best_metrics == pytest.approx(plain.best_metrics, rel=1e-4)


@pytest.mark.slow
@pytest.mark.compile
def test_compiled_towers_compute_the_same_steps(tiny):
    from torch._dynamo.utils import counters

    plain = run(tiny, "plain", model="clipse-tiny-64")
    graphs = counters["stats"]["unique_graphs"]
    compiled = run(tiny, "compiled", model="clipse-tiny-64", compile=True)
    assert counters["stats"]["unique_graphs"] > graphs  # dynamo compiled the towers
    assert step_losses(compiled) == pytest.approx(step_losses(plain), rel=1e-3)


def test_compiled_training_graphs_keep_the_batch_size_static(tiny, monkeypatch):
    """An epoch's smaller last batch gets a graph of its own: torch.compile would otherwise
    switch the towers to a graph for any batch size, which ran every later full batch at about
    0.6 of the speed on this CPU. (Traced with a recording backend: no code is generated.)"""
    import functools

    graphs = []

    def recording_backend(graph_module, example_inputs):
        symbolic = any(isinstance(size, torch.SymInt) for node in graph_module.graph.find_nodes(op="placeholder")
                       if isinstance(node.meta.get("example_value"), torch.Tensor)
                       for size in node.meta["example_value"].shape)
        graphs.append((torch.is_grad_enabled(), symbolic))
        return graph_module.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=recording_backend))
    try:
        train(tiny(model="clipse-tiny-64", compile=True, batch_size=64))  # 240 pairs: 3 batches of 64, then 48
    finally:
        torch.compiler.reset()  # no graph of the recording backend outlives the test
    training = [symbolic for grad, symbolic in graphs if grad]
    assert len(training) == 4 and not any(training)  # two towers, at 64 and at 48


def test_a_full_crop_is_the_identity_and_a_flip_mirrors(monkeypatch):
    import clipse.training.batches as batches

    images = torch.rand(4, 3, 8, 8)
    monkeypatch.setattr(batches, "CROP_SCALE", (1.0, 1.0))
    monkeypatch.setattr(batches, "CROP_RATIO", (1.0, 1.0))
    kept = augment_batch(images, torch.Generator().manual_seed(0), flip=False)
    assert torch.allclose(kept, images, atol=1e-5)
    flipped = augment_batch(images, torch.Generator().manual_seed(1), flip=True)
    mirrored = [torch.allclose(flipped[i], images[i].flip(-1), atol=1e-5) for i in range(4)]
    same = [torch.allclose(flipped[i], images[i], atol=1e-5) for i in range(4)]
    assert all(m or s for m, s in zip(mirrored, same)) and any(mirrored)


def test_augmentation_is_seeded_by_the_step(tiny):
    from clipse.training.assembly import dataset_for, model_for, split_tensors

    config = tiny()
    loaded = model_for(config)
    split = split_tensors(dataset_for(config), "train", loaded)
    normalize = ImageNormalizer(loaded.mean, loaded.std, torch.device("cpu"))
    batch = torch.arange(8).numpy()
    plain = TrainingBatches(split, normalize)(batch, 3).images()
    crops = TrainingBatches(split, normalize, "crop_flip", seed=5)
    whole = crops(batch, 3).images()
    assert torch.equal(whole, TrainingBatches(split, normalize, "crop_flip", seed=5)(batch, 3).images())
    assert not torch.equal(whole, crops(batch, 4).images())
    assert not torch.equal(whole, plain) and whole.shape == plain.shape
    assert torch.equal(crops(batch, 3).tokens, TrainingBatches(split, normalize)(batch, 3).tokens)  # untouched
    # a micro-batch's chunk and a rank's share get the crops they get in the whole batch
    assert torch.allclose(crops(batch, 3).images(slice(2, 5)), whole[2:5], atol=1e-6)
    second_rank = crops(batch, 3, Ranks(rank=1, world=2))
    assert torch.allclose(second_rank.images(), whole[4:], atol=1e-6)
    assert torch.allclose(second_rank.images(slice(1, 3)), whole[5:7], atol=1e-6)


def test_an_augmented_run_is_reproducible_and_differs(tiny):
    first, again, plain = run(tiny, "a", augment="crop"), run(tiny, "b", augment="crop"), run(tiny, "c")
    assert step_losses(first) == step_losses(again) != step_losses(plain)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_batches_on_cuda_equal_the_cpu_path(tiny):
    from clipse.training.assembly import dataset_for, model_for, split_tensors

    config = tiny()
    loaded = model_for(config)
    split = split_tensors(dataset_for(config), "train", loaded)
    on_cpu = TrainingBatches(split, ImageNormalizer(loaded.mean, loaded.std, torch.device("cpu")))
    on_gpu = TrainingBatches(split, ImageNormalizer(loaded.mean, loaded.std, torch.device("cuda")))
    batches = [torch.arange(8).numpy(), torch.arange(8, 20).numpy(), torch.arange(5).numpy(),
               torch.arange(20, 28).numpy(), torch.arange(3, 11).numpy()]
    on_device = [on_gpu(batch, step) for step, batch in enumerate(batches)]  # buffers reused before any check
    torch.cuda.synchronize()
    for step, (batch, got) in enumerate(zip(batches, on_device)):
        expected = on_cpu(batch, step)
        assert torch.allclose(got.images().cpu(), expected.images()) and torch.equal(got.tokens.cpu(), expected.tokens)
