"""The typed training configuration: the single source of truth for every default.

The CLI flags of ``clipse.train``, YAML run files, the run folder's ``config.yaml`` and the search
spaces all map onto ``TrainConfig`` fields by their *key* (the field name, except ``lam`` whose
key is ``lambda``). Nothing else defines a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from clipse.data.readers import DATA_KINDS
from clipse.errors import UserError

LOSS_NAMES = ("infonce", "sanw_debias", "sanw_bandpass")
DEVICES = ("auto", "cpu", "cuda")
SELECT_METRICS = ("val_r1_mean", "val_i2t_r1", "val_t2i_r1", "val_rsum")


def _opt(default, help: str, *, flag: str | None = None, key: str | None = None, choices=None):
    metadata = {"help": help}
    if flag:
        metadata["flag"] = flag
    if key:
        metadata["key"] = key
    if choices:
        metadata["choices"] = choices
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    # data
    data: str = _opt("shapes", "dataset format", choices=DATA_KINDS)
    data_root: str | None = _opt(None, "dataset folder or file (shapes: where to generate; default the cache)")
    image_root: str | None = _opt(None, "image folder, when it is not found next to the captions")
    shapes_train_images: int = _opt(1200, "synthetic dataset: training images (5 captions each)")
    shapes_val_images: int = _opt(100, "synthetic dataset: validation images")
    shapes_test_images: int = _opt(100, "synthetic dataset: test images")
    data_seed: int = _opt(0, "seed of the synthetic dataset and of automatic splits")
    val_fraction: float = _opt(0.1, "automatic split: share of images for validation")
    test_fraction: float = _opt(0.1, "automatic split: share of images for test")
    # model
    model: str = _opt("clipse-tiny", "OpenCLIP architecture name (see --list-models)")
    pretrained: str | None = _opt(None, "pretrained tag already in the local cache, or a checkpoint file")
    lock_image: bool = _opt(False, "freeze the image tower")
    lock_text: bool = _opt(False, "freeze the text tower")
    # loss (SPEC §1)
    loss: str = _opt("infonce", "contrastive loss", choices=LOSS_NAMES)
    alpha: float = _opt(0.2, "SANW strength")
    delta: float = _opt(0.3, "SANW-Debias threshold on the affinity")
    lam: float = _opt(1.0, "SANW-Debias gate sharpness", flag="--lambda", key="lambda")
    m1: float = _opt(0.2, "SANW-Bandpass lower band edge")
    m2: float = _opt(0.85, "SANW-Bandpass upper band edge")
    gamma: float = _opt(0.75, "SANW-Bandpass edge width")
    rho: float = _opt(0.5, "affinity mix: 1.0 = text-only affinity, 0.0 = image-only")
    alpha_warmup_epochs: float = _opt(0.0, "ramp SANW strength linearly from 0 over this many epochs")
    # optimisation (SPEC §5)
    epochs: int = _opt(5, "training epochs")
    batch_size: int = _opt(128, "pairs per batch")
    lr: float = _opt(2e-3, "peak learning rate (the tiny default model trains from scratch)")
    weight_decay: float = _opt(0.1, "AdamW weight decay (not on gains, biases, logit_scale)")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.98, "AdamW beta2")
    eps: float = _opt(1e-6, "AdamW epsilon")
    warmup_epochs: float = _opt(1.0, "linear learning-rate warm-up before the cosine decay")
    grad_clip: float = _opt(1.0, "gradient norm clip (0 = off)")
    init_temperature: float = _opt(0.03, "initial temperature of a randomly initialised model "
                                    "(0.03 trains the tiny default faster than CLIP's 0.07)")
    topical_batching: bool = _opt(False, "draw batches from k-means clusters of the captions")
    topical_clusters: int = _opt(0, "clusters for topical batching (0 = adapt to the data size)")
    # run
    seed: int = _opt(0, "seed of model init, batch order and everything random in training")
    device: str = _opt("auto", "where to train", choices=DEVICES)
    threads: int = _opt(0, "CPU threads for torch (0 = torch's default)")
    select_metric: str = _opt("val_r1_mean", "validation metric that picks the best checkpoint",
                              choices=SELECT_METRICS)
    log_every: int = _opt(1, "steps between rows of training.csv")
    eval_test: bool = _opt(False, "after training, evaluate the best checkpoint on the test split")
    run_dir: str | None = _opt(None, "run folder (default studies/runs/<run id>)")
    registry: str = _opt("studies/run_registry.csv", "CSV that gets one row per finished run")
    study: str = _opt("", "study this run belongs to (for the registry)")
    trial: int | None = _opt(None, "trial number within the study (for the registry)")
    resume: bool = _opt(False, "continue from the run folder's last checkpoint")
    progress: bool = _opt(True, "show a progress bar per epoch")

    # ------------------------------------------------------------------------------------------
    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_mapping(self) -> dict[str, Any]:
        """Keys as users write them (``lambda``, not ``lam``), in field order."""
        return {config_key(f): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], source: str, base: "TrainConfig | None" = None) -> "TrainConfig":
        """Apply user-written keys onto ``base`` (defaults), checking names and types."""
        base = base or cls()
        return base.replace(**{attr: value for attr, value in coerce_values(mapping, source).items()})

    def validate(self) -> "TrainConfig":
        """Raise ``UserError`` for settings that cannot train; return self."""
        problems = []
        if self.loss == "sanw_debias" and not 0 <= self.alpha < 1:
            problems.append(f"alpha={self.alpha}: SANW-Debias needs 0 <= alpha < 1")
        if self.loss == "sanw_bandpass":
            if self.alpha < 0:
                problems.append(f"alpha={self.alpha}: SANW-Bandpass needs alpha >= 0")
            if not self.m1 < self.m2:
                problems.append(f"m1={self.m1}, m2={self.m2}: the band needs m1 < m2")
            if self.gamma <= 0:
                problems.append(f"gamma={self.gamma}: needs gamma > 0")
        if not 0 <= self.rho <= 1:
            problems.append(f"rho={self.rho}: needs 0 <= rho <= 1")
        for name, low in (("epochs", 1), ("batch_size", 2), ("log_every", 1), ("shapes_train_images", 2),
                          ("shapes_val_images", 1), ("shapes_test_images", 1)):
            if getattr(self, name) < low:
                problems.append(f"{name}={getattr(self, name)}: needs at least {low}")
        for name in ("lr", "warmup_epochs", "weight_decay", "grad_clip", "alpha_warmup_epochs", "threads",
                     "topical_clusters"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)}: must not be negative")
        if self.init_temperature <= 0:
            problems.append(f"init_temperature={self.init_temperature}: must be positive")
        if self.data != "shapes" and not self.data_root:
            problems.append(f"data={self.data} needs data_root (--data-root)")
        if problems:
            raise UserError("invalid configuration: " + "; ".join(problems))
        return self


def config_key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


FIELD_BY_KEY = {config_key(f): f for f in fields(TrainConfig)}


def _type_name(f: dataclasses.Field) -> str:
    return str(f.type).replace(" | None", "")


def coerce_value(key: str, value: Any, source: str) -> Any:
    """Check one user-written value against its field's type; ints are accepted for floats."""
    f = FIELD_BY_KEY[key]
    kind = _type_name(f)
    optional = "None" in str(f.type)
    if value is None and optional:
        return None
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind]
    if not ok:
        raise UserError(f"{source}: '{key}' must be {kind}, got {value!r}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise UserError(f"{source}: '{key}' must be one of {', '.join(choices)}, got {value!r}")
    return float(value) if kind == "float" else value


def unknown_key_message(key: str, source: str, known=None) -> str:
    known = list(known or FIELD_BY_KEY)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{source}: unknown setting '{key}'{hint}"


def coerce_values(mapping: Mapping[str, Any], source: str) -> dict[str, Any]:
    """User keys -> dataclass attribute names, with every value checked."""
    out = {}
    for key, value in mapping.items():
        if key not in FIELD_BY_KEY:
            raise UserError(unknown_key_message(str(key), source))
        out[FIELD_BY_KEY[key].name] = coerce_value(key, value, source)
    return out


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of settings at the top level")
    return data


def load_config_file(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    return TrainConfig.from_mapping(read_yaml_mapping(path), str(path), base)


def save_config(config: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_mapping(), sort_keys=False))


# ----------------------------------------------------------------------------------------------
# argparse: one option per field, all defaulting to "not given" so that file < flags < defaults


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + config_key(f).replace("_", "-"))


def add_config_arguments(parser: argparse.ArgumentParser, only: list[str] | None = None) -> None:
    """Add ``--<key>`` options for the fields (or only the given keys) to ``parser``."""
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        key = config_key(f)
        if only is not None and key not in only:
            continue
        kind = _type_name(f)
        help_text = f"{f.metadata['help']} (default: {getattr(defaults, f.name)})"
        kwargs: dict[str, Any] = {"dest": f"cfg_{key}", "default": argparse.SUPPRESS, "help": help_text}
        if kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = {"int": int, "float": float, "str": str}[kind]
            kwargs["metavar"] = kind.upper() if kind != "str" else "VALUE"
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(flag_of(f), **kwargs)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The user keys set on the command line."""
    return {name[4:]: value for name, value in vars(args).items() if name.startswith("cfg_")}
