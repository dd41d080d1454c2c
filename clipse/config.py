"""The typed training configuration: the single source of truth for every training default.

The CLI flags of ``clipse.train``, YAML run files, the run folder's ``config.yaml`` and the search
spaces all map onto settings by their *key*: a ``TrainConfig`` field (by name), or a parameter of
a registered loss (``alpha``, ``lambda``, ...), which the loss itself defines
(``clipse.losses``). ``TrainConfig.loss_params`` holds one value per loss-parameter key.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from dataclasses import Field, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from clipse.data.formats import FORMATS, format_names
from clipse.data.synthetic import SHAPES_DOMAINS, SHAPES_FN_LEVELS
from clipse.losses import (
    AFFINITY_SOURCES,
    LOSSES,
    ContrastiveLoss,
    loss_defaults,
    loss_names,
    loss_parameters,
)
from clipse.util.errors import UserError
from clipse.util.fields import (
    add_argument,
    choices_of,
    default_of,
    is_optional,
    key_of,
    keys_in_group,
    kind_of,
    setting,
)
from clipse.util.paths import ADHOC_RUNS_DIR, DEFAULT_STUDIES_DIR, registry_file

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "amp_bf16", "amp_fp16")
AUGMENTATIONS = ("none", "crop", "crop_flip")
SELECT_METRICS = ("val_r1_mean", "val_i2t_r1", "val_t2i_r1", "val_rsum", "val_zs_top1")
# Checks of settings whose meaning lives in a higher layer (the trackers check --report-to): each
# registers itself when imported, since this module cannot import them (``TrainConfig.validate``).
SETTING_CHECKS: list[Callable[["TrainConfig"], list[str]]] = []


@dataclass
class TrainConfig:
    # data: these settings (with the model) define what a run is tested on
    data: str = setting("shapes", "dataset format (one module each in clipse/data/formats/)", choices=format_names,
                        group="data")
    data_root: str | None = setting(None, "dataset folder or file (shapes: where to generate; default the cache)",
                                    group="data")
    image_root: str | None = setting(None, "image folder, when it is not found next to the captions", group="data")
    shapes_train_images: int = setting(1200, "synthetic dataset: training images (5 captions each)", group="data")
    shapes_val_images: int = setting(500, "synthetic dataset: validation images", group="data")
    shapes_test_images: int = setting(1000, "synthetic dataset: test images", group="data")
    shapes_fn_level: str = setting("default", "synthetic dataset: how often an in-batch negative truly matches its "
                                   "caption (the mix of caption levels; docs/reference/data.md)", choices=SHAPES_FN_LEVELS,
                                   group="data")
    shapes_domain: str = setting("default", "synthetic dataset: what scenes and captions are drawn from (pretraining: "
                                 "the embedded pretrained model's corpus; docs/reference/data.md)",
                                 choices=SHAPES_DOMAINS, group="data")
    data_seed: int = setting(0, "seed of the synthetic dataset and of automatic splits", group="data")
    val_fraction: float = setting(0.1, "automatic split: share of images for validation", group="data")
    test_fraction: float = setting(0.1, "automatic split: share of images for test", group="data")
    # model
    model: str = setting("clipse-tiny", "OpenCLIP architecture name (see --list-models)", group="model")
    pretrained: str | None = setting("shapes-pretrained", "the weights to start from: a pretrained tag (the embedded "
                                     "shapes-pretrained, built on first use, or an OpenCLIP tag already in the local "
                                     "cache), a checkpoint file, or none (random init)", group="model")
    lock_image: bool = setting(False, "freeze the image tower", group="model")
    lock_text: bool = setting(False, "freeze the text tower", group="model")
    # loss (docs/reference/losses.md); its parameters are defined by the losses themselves
    loss: str = setting("infonce", "contrastive loss", choices=loss_names)
    loss_params: dict[str, Any] = dataclasses.field(default_factory=loss_defaults)
    affinity: str = setting("online", "where a loss's affinity comes from: online (the model being trained), frozen "
                                      "(the starting model), ema (a moving average of the model), truth (the data's "
                                      "known answer; synthetic data only)", choices=AFFINITY_SOURCES)
    ema_decay: float = setting(0.999, "--affinity ema: the moving average's decay per optimizer step")
    alpha_warmup_epochs: float = setting(0.0, "ramp the loss's strength (SANW alpha) linearly from 0 over this "
                                              "many epochs")
    # optimisation
    epochs: int = setting(2, "training epochs")
    batch_size: int = setting(128, "pairs per batch")
    lr: float = setting(1e-3, "peak learning rate (fine-tuning the embedded tiny model; a large pretrained CLIP "
                              "wants about 1e-5, from scratch the tiny model about 2e-3)")
    weight_decay: float = setting(0.1, "AdamW weight decay (not on gains, biases, logit_scale)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.98, "AdamW beta2")
    eps: float = setting(1e-6, "AdamW epsilon")
    warmup_epochs: float = setting(1.0, "linear learning-rate warm-up before the cosine decay")
    grad_clip: float = setting(1.0, "gradient norm clip (0 = off)")
    init_temperature: float = setting(0.03, "initial temperature of a randomly initialised model (0.03 trains the "
                                            "tiny model faster than CLIP's 0.07; pretrained weights keep their own)")
    augment: str = setting("none", "training-time augmentation on the device: random resized crops (crop), and "
                                   "horizontal flips (crop_flip: not for captions that say left or right)",
                           choices=AUGMENTATIONS)
    topical_batching: bool = setting(False, "draw batches from k-means clusters of the captions")
    topical_clusters: int = setting(0, "clusters for topical batching (0 = adapt to the data size)")
    caption_noise: float = setting(0.0, "share of training pairs whose captions are shuffled among themselves (a "
                                        "planted harm with a known sign, for checking that a comparison detects it)")
    # run
    seed: int = setting(0, "seed of model init, batch order and everything random in training")
    device: str = setting("auto", "where to train", choices=DEVICES)
    threads: int = setting(0, "CPU threads for torch (0 = torch's default)")
    nproc: int = setting(1, "processes that train the run data-parallel (one GPU each with --device cuda); the loss "
                            "and SANW weights still see the whole --batch-size, gathered from all of them")
    micro_batch: int = setting(0, "encode each process's share of a batch this many pairs at a time (GradCache: "
                                  "the loss still sees the whole batch, memory stays that of the micro-batch; "
                                  "0 = off)")
    precision: str = setting("auto", "auto: bf16 autocast on CUDA where supported (else fp16 with loss scaling), "
                                     "fp32 on the CPU; or fp32, amp_bf16, amp_fp16 (CUDA only)", choices=PRECISIONS)
    compile: bool = setting(False, "torch.compile the image and text towers (the first steps compile)")
    grad_checkpointing: bool = setting(False, "recompute the towers' activations in the backward pass (less memory, "
                                              "more time)")
    select_metric: str = setting("val_r1_mean", "validation metric that picks the best checkpoint",
                                 choices=SELECT_METRICS)
    log_every: int = setting(10, "steps between rows of training.csv (and the only steps that wait for the "
                                 "device: statistics are summed there in between)")
    eval_test: bool = setting(False, "after training, evaluate the best checkpoint on the test split")
    zeroshot: str = setting("auto", "zero-shot classification set that measures what fine-tuning forgets: a folder per "
                                    "class, a filepath,label CSV, shapes (generated from the pretraining domain), none; "
                                    "auto: shapes on the synthetic data, else none", group="data")
    zeroshot_templates: str | None = setting(None, "file of prompt templates for --zeroshot, one per line with {} for "
                                                   "the class name", shown_default="a built-in set of 5", group="data")
    zeroshot_every: int = setting(1, "epochs between zero-shot evaluations (0: only before training and on the test "
                                     "checkpoint)")
    run_dir: str | None = setting(None, "run folder", shown_default=f"{ADHOC_RUNS_DIR}/<run id>")
    registry: str = setting(str(registry_file(DEFAULT_STUDIES_DIR)), "CSV that gets one row per finished run")
    study: str = setting("", "study this run belongs to (for the registry)")
    trial: int | None = setting(None, "trial number within the study (for the registry)")
    resume: bool = setting(False, "continue from the run folder's last checkpoint")
    progress: bool = setting(True, "show a progress bar per epoch")
    # tracking (docs/reference/trackers.md): where else the run is recorded; the run folder always is
    report_to: str = setting("none", "experiment trackers that record the run as it trains: none, tensorboard, mlflow "
                                     "(several separated by commas)", group="tracking")
    mlflow_uri: str | None = setting(None, "MLflow tracking URI (http://host:port of an mlflow server, "
                                           "sqlite:///file.db, ...); unset: mlflow.db beside --registry",
                                     shown_default="sqlite:///studies/mlflow.db", group="tracking")
    mlflow_experiment: str = setting("clipse", "MLflow experiment of the run", group="tracking")
    mlflow_parent_run: str | None = setting(None, "MLflow run id to nest this run under (a study's run)",
                                            group="tracking")

    def __post_init__(self):
        """Every registered loss parameter gets a value (its default unless given)."""
        unknown = set(self.loss_params) - set(loss_parameters())
        if unknown:
            raise UserError(unknown_key_message(sorted(unknown)[0], "loss_params"))
        self.loss_params = {**loss_defaults(), **self.loss_params}

    # ------------------------------------------------------------------------------------------
    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_mapping(self) -> dict[str, Any]:
        """Keys as users write them (loss parameters flattened in after ``loss``), in field order."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "loss_params":
                out.update(self.loss_params)
            else:
                out[key_of(f)] = getattr(self, f.name)
        return out

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], source: str, base: "TrainConfig | None" = None) -> "TrainConfig":
        """Apply user-written keys onto ``base`` (defaults), checking names and types."""
        base = base or cls()
        values = coerce_values(mapping, source)
        own = {f.name for f in fields(cls)}
        changes = {name: value for name, value in values.items() if name in own}
        loss_values = {key: value for key, value in values.items() if name_is_loss_key(key)}
        return base.replace(**changes, loss_params={**base.loss_params, **loss_values})

    def loss_function(self) -> ContrastiveLoss:
        """The configured loss, with its parameters."""
        return LOSSES[self.loss].from_settings(self.loss_params)

    @property
    def zeroshot_source(self) -> str | None:
        """The zero-shot set to measure, or None (``auto``: shapes on the synthetic data)."""
        if self.zeroshot == "auto":
            return "shapes" if self.data == "shapes" else None
        return None if self.zeroshot.lower() == "none" else self.zeroshot

    def validate(self) -> "TrainConfig":
        """Raise ``UserError`` for settings that cannot train; return self."""
        problems = []
        if self.loss not in LOSSES:
            problems.append(f"loss={self.loss!r}: unknown (choose from {', '.join(loss_names())})")
        else:
            problems += self.loss_function().problems()
        for name, low in (("epochs", 1), ("batch_size", 2), ("log_every", 1), ("shapes_train_images", 2),
                          ("zeroshot_every", 0),
                          ("shapes_val_images", 1), ("shapes_test_images", 1), ("nproc", 1), ("micro_batch", 0)):
            if getattr(self, name) < low:
                problems.append(f"{name}={getattr(self, name)}: needs at least {low}")
        for name in ("lr", "warmup_epochs", "weight_decay", "grad_clip", "alpha_warmup_epochs", "threads",
                     "topical_clusters", "caption_noise"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)}: must not be negative")
        if self.batch_size < self.nproc:
            problems.append(f"batch_size={self.batch_size}: needs at least one pair per process (nproc={self.nproc})")
        if self.init_temperature <= 0:
            problems.append(f"init_temperature={self.init_temperature}: must be positive")
        if self.select_metric == "val_zs_top1" and self.zeroshot_source is None:
            problems.append("select_metric=val_zs_top1 needs a zero-shot set (--zeroshot)")
        if self.caption_noise > 1:
            problems.append(f"caption_noise={self.caption_noise}: a share, at most 1")
        if not 0 <= self.ema_decay < 1:
            problems.append(f"ema_decay={self.ema_decay}: needs 0 <= ema_decay < 1")
        if self.affinity == "truth" and self.data in FORMATS and not FORMATS[self.data].has_ground_truth:
            problems.append(f"affinity=truth needs data that knows which captions describe which images; --data "
                            f"{self.data} does not (the synthetic shapes data does)")
        if self.shapes_domain != "default" and self.shapes_fn_level != "default":
            problems.append(f"shapes_domain={self.shapes_domain} draws its own captions; it takes no shapes_fn_level")
        for check in SETTING_CHECKS:
            problems += check(self)
        if self.data in FORMATS and FORMATS[self.data].needs_root and not self.data_root:
            problems.append(f"data={self.data} needs data_root (--data-root)")
        if problems:
            raise UserError("invalid configuration: " + "; ".join(problems))
        return self


# Settings that define the test set: runs compared in one report must agree on all of them.
DATA_KEYS = keys_in_group(TrainConfig, "data")
MODEL_KEYS = keys_in_group(TrainConfig, "model")
TEST_SET_KEYS = (*DATA_KEYS, "model")
# Settings of the experiment trackers: they change where a run is recorded, not what it computes.
TRACKING_KEYS = keys_in_group(TrainConfig, "tracking")
# The ones a search or final report takes (the parent run is the study's own, set by the command).
STUDY_TRACKING_KEYS = tuple(key for key in TRACKING_KEYS if key != "mlflow_parent_run")


def name_is_loss_key(key: str) -> bool:
    return key in loss_parameters()


def setting_fields() -> dict[str, Field]:
    """Every setting by key: the ``TrainConfig`` fields and the registered loss parameters
    (evaluated per call, because losses may be registered after this module is imported)."""
    out: dict[str, Field] = {}
    for f in fields(TrainConfig):
        if f.name != "loss_params":
            out[key_of(f)] = f
    for key, f in loss_parameters().items():
        if key in out:
            raise ValueError(f"loss parameter '{key}' has the name of a training setting; rename it")
        out[key] = f
    return out


def coerce_value(key: str, value: Any, source: str) -> Any:
    """Check one user-written value against its setting's type; ints are accepted for floats."""
    f = setting_fields()[key]
    kind = kind_of(f)
    if value is None and is_optional(f):
        return None
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind]
    if not ok:
        raise UserError(f"{source}: '{key}' must be {kind}, got {value!r}")
    choices = choices_of(f)
    if choices and value not in choices:
        raise UserError(f"{source}: '{key}' must be one of {', '.join(choices)}, got {value!r}")
    return float(value) if kind == "float" else value


def unknown_key_message(key: str, source: str) -> str:
    close = difflib.get_close_matches(key, list(setting_fields()), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{source}: unknown setting '{key}'{hint}"


def coerce_values(mapping: Mapping[str, Any], source: str) -> dict[str, Any]:
    """User keys -> attribute names (loss parameters keep their key), every value checked."""
    known = setting_fields()
    out = {}
    for key, value in mapping.items():
        if key not in known:
            raise UserError(unknown_key_message(str(key), source))
        out[key if name_is_loss_key(key) else known[key].name] = coerce_value(key, value, source)
    return out


def read_yaml_document(path: str | Path) -> Any:
    """A YAML file's content; any problem reading or parsing it is one line naming the file."""
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
    return data


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    data = read_yaml_document(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of settings at the top level")
    return data


def load_config_file(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    return TrainConfig.from_mapping(read_yaml_mapping(path), str(path), base)


def config_yaml(config: TrainConfig) -> str:
    return yaml.safe_dump(config.to_mapping(), sort_keys=False)


# ----------------------------------------------------------------------------------------------
# argparse: one option per setting, all defaulting to "not given" so that file < flags < defaults


def add_config_arguments(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """Add ``--<key>`` options for the settings (or only the given keys) to ``parser``."""
    for key, f in setting_fields().items():
        if only is None or key in only:
            add_argument(parser, f, dest=f"cfg_{key}", default=argparse.SUPPRESS, shown_default=default_of(f))


def add_tracking_arguments(parser: argparse.ArgumentParser, of: str) -> None:
    """The experiment-tracker options (``STUDY_TRACKING_KEYS``) of the ``of`` ("runs", "trials")
    a command trains, as a group of ``parser``."""
    add_config_arguments(parser.add_argument_group(f"experiment trackers of the {of} (docs/reference/trackers.md)"),
                         only=STUDY_TRACKING_KEYS)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The user keys set on the command line."""
    return {name[4:]: value for name, value in vars(args).items() if name.startswith("cfg_")}
