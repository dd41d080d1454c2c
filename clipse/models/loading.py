"""OpenCLIP models, fully offline.

A model is an OpenCLIP architecture name plus nothing (random init), a pretrained tag whose
weights are already in the local cache, or a local checkpoint file (plain state dict, OpenCLIP
training checkpoint with ``state_dict`` and ``module.`` prefixes, ``.safetensors``, or a clipse
run checkpoint). The project's own small architectures in ``clipse/models/configs`` are
registered with OpenCLIP on import. Nothing is ever downloaded, and checkpoint files are read
with ``weights_only=True`` (``clipse.util.checkpoints``).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.factory import load_state_dict

from clipse.util.checkpoints import checkpoint_error
from clipse.util.errors import UserError

PROJECT_CONFIG_DIR = Path(__file__).parent / "configs"
PROJECT_MODELS = sorted(p.stem for p in PROJECT_CONFIG_DIR.glob("*.json"))
if not set(PROJECT_MODELS) <= set(open_clip.list_models()):
    open_clip.add_model_config(PROJECT_CONFIG_DIR)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


class _QuietIntendedRandomInit(logging.Filter):
    """OpenCLIP warns on the root logger whenever a model starts from random weights; for
    clipse that is the intended default, so that one message is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


logging.getLogger().addFilter(_QuietIntendedRandomInit())


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object            # open_clip tokenizer: list[str] -> LongTensor (C, context_length)
    tokenizer_id: str            # names the tokenisation, for the token cache key
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: str                 # where the weights came from ("random init", a path)


def list_models() -> list[str]:
    return list(PROJECT_MODELS) + [m for m in open_clip.list_models() if m not in PROJECT_MODELS]


def _open_clip_cache_dirs() -> list[Path]:
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return [Path(os.environ.get("HF_HUB_CACHE", hf_home / "hub"))]


def cached_pretrained_file(model_name: str, tag: str) -> Path | None:
    """The local file of a pretrained tag, if the HF hub cache or OpenCLIP's URL cache has it."""
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    hf_hub = cfg.get("hf_hub", "")
    if hf_hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hf_hub)
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for cache in _open_clip_cache_dirs():
            for name in names:
                found = try_to_load_from_cache(repo_id, name, cache_dir=cache)
                if isinstance(found, str) and Path(found).is_file():
                    return Path(found)
    url = cfg.get("url", "")
    if url:
        candidate = Path.home() / ".cache" / "clip" / os.path.basename(url)
        if candidate.is_file():
            return candidate
    return None


def resolve_weights(model_name: str, pretrained: str | None) -> Path | None:
    """``None`` for random init (no ``pretrained``, or ``none``); otherwise the local file to load.
    Never downloads."""
    if not pretrained or pretrained.lower() == "none":
        return None
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path
    if path.suffix in CHECKPOINT_SUFFIXES or os.sep in pretrained:
        raise UserError(f"{pretrained}: checkpoint file not found")
    if not open_clip.get_pretrained_cfg(model_name, pretrained):
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        known = f"known tags: {', '.join(tags)}" if tags else "it has no pretrained tags"
        raise UserError(f"'{pretrained}' is neither a file nor a pretrained tag of {model_name} ({known})")
    cached = cached_pretrained_file(model_name, pretrained)
    if cached is None:
        raise UserError(
            f"pretrained weights {model_name}/{pretrained} are not in the local cache and clipse never downloads; "
            f"pre-stage them on a machine with internet: python -c \"import open_clip; "
            f"open_clip.create_model('{model_name}', pretrained='{pretrained}')\", then copy ~/.cache/huggingface "
            f"(or ~/.cache/clip) here, or pass the checkpoint file with --pretrained PATH")
    return cached


def load_weights(model: torch.nn.Module, path: Path, model_name: str) -> None:
    try:
        state = load_state_dict(str(path), weights_only=True)
    except Exception as exc:  # torch and safetensors raise many kinds for a damaged or unsafe file
        raise checkpoint_error(path, exc) from None
    if "logit_bias" in state and getattr(model, "logit_bias", None) is None:  # trained with SigLIP's bias
        model.logit_bias = torch.nn.Parameter(torch.zeros_like(state["logit_bias"]))
    model_keys = set(model.state_dict())
    missing = sorted(model_keys - set(state))
    unexpected = sorted(set(state) - model_keys)
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise UserError(f"{path}: does not fit model {model_name} ({len(missing)} missing and "
                        f"{len(unexpected)} unexpected weights, e.g. '{example}')")
    try:
        open_clip.load_checkpoint(model, str(path), weights_only=True)
    except RuntimeError as exc:
        raise UserError(f"{path}: does not fit model {model_name} ({str(exc).splitlines()[-1].strip()})") from None


def create_model(name: str, pretrained: str | None = None, *, init_temperature: float | None = None,
                 lock_image: bool = False, lock_text: bool = False) -> LoadedModel:
    """``init_temperature`` sets the temperature of randomly initialised weights (None keeps
    OpenCLIP's); loaded weights keep their own."""
    if name not in open_clip.list_models():
        raise UserError(f"unknown model '{name}' (project models: {', '.join(PROJECT_MODELS)}; "
                        f"see python -m clipse.train --list-models)")
    weights = resolve_weights(name, pretrained)
    is_tag = weights is not None and not Path(pretrained).expanduser().is_file()
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) if is_tag else {}
    model = open_clip.create_model(name, pretrained=None, force_quick_gelu=bool(tag_cfg.get("quick_gelu")))
    if weights is None and init_temperature is not None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1.0 / init_temperature))
    elif weights is not None:
        load_weights(model, weights, name)
    if lock_image:
        model.lock_image_tower(unlocked_groups=0, freeze_bn_stats=False)
    if lock_text:
        model.lock_text_tower(unlocked_layers=0, freeze_layer_norm=True)
    preprocess = open_clip.get_model_preprocess_cfg(model)
    image_size = preprocess["size"]
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    tokenizer = open_clip.get_tokenizer(name)
    context = getattr(tokenizer, "context_length", None) or model.context_length
    return LoadedModel(
        model=model, tokenizer=tokenizer, tokenizer_id=f"{type(tokenizer).__name__}:{name}:{context}",
        image_size=int(image_size), mean=tuple(tag_cfg.get("mean", preprocess["mean"])),
        std=tuple(tag_cfg.get("std", preprocess["std"])), weights=str(weights) if weights else "random init",
    )


def interpolate_weights(start: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor],
                        alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT's weight-space ensemble (1 - alpha) * start + alpha * tuned, tensor by tensor.
    ``torch.lerp`` returns ``start`` itself at alpha 0 and ``tuned`` itself at 1 (bit for bit);
    tensors that are not floating point (counters, ids) are taken from ``tuned``."""
    if start.keys() != tuned.keys():
        missing = sorted(set(start) ^ set(tuned))
        raise ValueError(f"the two state dicts hold different tensors: {', '.join(missing[:5])}")
    return {key: torch.lerp(start[key].to(value.dtype), value, alpha) if value.is_floating_point() else value
            for key, value in ((key, tuned[key]) for key in tuned)}
