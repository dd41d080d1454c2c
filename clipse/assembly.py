"""Builds what a ``TrainConfig`` names: device, dataset, model, split tensors, autocast."""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch

from clipse.config import TrainConfig
from clipse.data import CaptionDataset, ShapesSpec, SplitTensors, load_caption_dataset, load_split_tensors
from clipse.errors import UserError
from clipse.models import LoadedModel, create_model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    return torch.device(name)


def autocast_for(device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """AMP on CUDA (bf16 where supported, else fp16); nothing on the CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return functools.partial(torch.autocast, device_type="cuda", dtype=dtype)


def dataset_for(config: TrainConfig) -> CaptionDataset:
    shapes = ShapesSpec(config.shapes_train_images, config.shapes_val_images, config.shapes_test_images,
                        config.data_seed)
    return load_caption_dataset(config.data, config.data_root, config.image_root, shapes=shapes,
                                split_seed=config.data_seed, val_fraction=config.val_fraction,
                                test_fraction=config.test_fraction)


def model_for(config: TrainConfig) -> LoadedModel:
    return create_model(config.model, config.pretrained, init_temperature=config.init_temperature,
                        lock_image=config.lock_image, lock_text=config.lock_text)


def split_tensors(dataset: CaptionDataset, split: str, loaded: LoadedModel) -> SplitTensors:
    return load_split_tensors(dataset.split(split), split, loaded.image_size, loaded.tokenizer,
                              loaded.tokenizer_id)
