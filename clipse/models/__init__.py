"""Models: OpenCLIP architectures (the project's small ones in ``configs/`` registered on
import) with random, cached-pretrained or checkpoint-file weights, always offline
(``clipse.models.loading``)."""

from clipse.models.loading import (
                                   CHECKPOINT_SUFFIXES,
                                   PROJECT_MODELS,
                                   LoadedModel,
                                   cached_pretrained_file,
                                   create_model,
                                   interpolate_weights,
                                   list_models,
                                   resolve_weights,
)

__all__ = ["CHECKPOINT_SUFFIXES", "PROJECT_MODELS", "LoadedModel", "cached_pretrained_file", "create_model",
           "interpolate_weights", "list_models", "resolve_weights"]
