"""Builds what a ``TrainConfig`` names: device, dataset, model, split tensors, autocast."""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch

from clipse.config import TrainConfig
from clipse.data import (
    CaptionDataset,
    ShapesSpec,
    SplitTensors,
    load_caption_dataset,
    load_split_tensors,
)
from clipse.data.zeroshot import ZeroShotSet, load_zeroshot_set
from clipse.evaluation.zeroshot import ZeroShotTensors, zeroshot_tensors
from clipse.models import LoadedModel, create_model
from clipse.training.embedded import built_file, is_embedded
from clipse.util.errors import UserError


def wants_cuda(name: str) -> bool:
    """Whether ``--device name`` trains on CUDA here (``auto``: where a GPU is available)."""
    return name == "cuda" or (name == "auto" and torch.cuda.is_available())


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    if name == "auto":
        return torch.device("cuda" if wants_cuda(name) else "cpu")
    return torch.device(name)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype of ``--precision`` on ``device`` (None: fp32); one line where it cannot work."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "amp_fp16" and device.type != "cuda":
        raise UserError("--precision amp_fp16 needs CUDA (float16 training needs loss scaling, which clipse does "
                        "on CUDA); on the CPU use amp_bf16 or fp32")
    if precision == "amp_bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision amp_bf16: this GPU does not support bfloat16; use amp_fp16")
    return torch.bfloat16 if precision == "amp_bf16" else torch.float16


def autocast_for(device: torch.device, precision: str = "auto") -> Callable[[], contextlib.AbstractContextManager]:
    """A context-manager factory for the forward passes at ``--precision``."""
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


def prepare_model(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    """``--grad-checkpointing`` and ``--compile`` applied to a model already on its device. Compiling
    replaces the two encoders with compiled versions; the module and its state dict stay as they are."""
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if config.compile:
        # A fresh start for each run: a worker process that compiled earlier runs' towers would
        # otherwise reach torch's limit of recompilations per frame and fall back to eager.
        torch.compiler.reset()
        model.encode_image = torch.compile(model.encode_image)
        model.encode_text = torch.compile(model.encode_text)
    return model


def dataset_for(config: TrainConfig) -> CaptionDataset:
    shapes = ShapesSpec(config.shapes_train_images, config.shapes_val_images, config.shapes_test_images,
                        config.data_seed, config.shapes_fn_level, config.shapes_domain)
    return load_caption_dataset(config.data, config.data_root, config.image_root, shapes=shapes,
                                split_seed=config.data_seed, val_fraction=config.val_fraction,
                                test_fraction=config.test_fraction)


def model_for(config: TrainConfig) -> LoadedModel:
    """The model, with the embedded pretrained model's file for its tag (``clipse.training.embedded``)."""
    weights = str(built_file(config.pretrained)) if is_embedded(config.pretrained) else config.pretrained
    return create_model(config.model, weights, init_temperature=config.init_temperature,
                        lock_image=config.lock_image, lock_text=config.lock_text)


def split_tensors(dataset: CaptionDataset, split: str, loaded: LoadedModel) -> SplitTensors:
    return load_split_tensors(dataset.split(split), split, loaded.image_size, loaded.tokenizer,
                              loaded.tokenizer_id, dataset.truth(split))


def zeroshot_set_for(config: TrainConfig) -> ZeroShotSet | None:
    """The zero-shot set ``--zeroshot`` names (None: none), read and checked: a bad folder, CSV
    or templates file is one line before anything is written."""
    source = config.zeroshot_source
    return None if source is None else load_zeroshot_set(source, config.zeroshot_templates)


def zeroshot_for(config: TrainConfig, loaded: LoadedModel) -> ZeroShotTensors | None:
    chosen = zeroshot_set_for(config)
    return None if chosen is None else zeroshot_tensors(chosen, loaded)
