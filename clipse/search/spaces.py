"""Search spaces: ``search_spaces/<name>.yaml``, validated on load.

A space file maps onto training-setting keys (``TrainConfig`` fields and loss parameters)::

    description: one line shown by --help
    extends: _shared            # optional: another file in the same folder (params and fixed merge)
    fixed:                      # settings every trial of the space uses
      loss: sanw_bandpass
    min_weight_std: 0.01        # optional: trials whose SANW weights spread less are infeasible
    params:                     # what the sampler chooses
      lr: {type: float, low: 5.0e-4, high: 5.0e-3, log: true}
      batch_size: {type: int, low: 64, high: 256, step: 64}
      topical_batching: {type: categorical, choices: [false, true]}

Files whose name starts with ``_`` are building blocks, not spaces of their own. Every problem
is reported as one line naming the file, the key and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna

import search_spaces
from clipse.config import (
    TrainConfig,
    coerce_value,
    read_yaml_mapping,
    setting_fields,
    unknown_key_message,
)
from clipse.util.errors import UserError
from clipse.util.fields import kind_of

SPACES_DIR = Path(search_spaces.__file__).parent  # installed with clipse, so found outside a clone too
TOP_KEYS = {"description", "extends", "fixed", "params", "min_weight_std"}
PARAM_KEYS = {"float": {"type", "low", "high", "log", "step"}, "int": {"type", "low", "high", "log", "step"},
              "categorical": {"type", "choices"}}


@dataclass(frozen=True)
class Param:
    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.key, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.key, list(self.choices))

    def admits(self, value: Any) -> bool:
        """Whether ``value`` (already of the setting's type) is a point of this parameter."""
        if self.type == "categorical":
            return value in self.choices
        return self.low <= value <= self.high

    def covers(self, low: float, high: float) -> bool:
        if self.type == "categorical":
            return low in self.choices and high in self.choices
        return self.low <= low and high <= self.high


@dataclass(frozen=True)
class SearchSpace:
    name: str
    path: Path
    description: str
    fixed: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Param] = field(default_factory=dict)
    min_weight_std: float = 0.0  # the default of --min-weight-std for studies of this space (0: off)

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Config keys -> values for one trial: the fixed settings plus the sampled ones."""
        return {**self.fixed, **{key: param.suggest(trial) for key, param in self.params.items()}}

    def check_point(self, point: Any, where: str) -> dict[str, Any]:
        """A user-written set of parameter values (a warm start), checked against the space.
        Parameters it leaves out are chosen by the sampler."""
        if not isinstance(point, dict) or not point:
            raise UserError(f"{where}: expected a mapping of parameter values, got {point!r}")
        checked = {}
        for key, value in point.items():
            if key not in self.params:
                raise UserError(f"{where}: '{key}' is not a parameter of space {self.name} "
                                f"({', '.join(self.params)})")
            checked[key] = coerce_value(key, value, where)
            if not self.params[key].admits(checked[key]):
                raise UserError(f"{where}: {key}={value!r} is outside the space's range")
        return checked

    def defaults(self) -> dict[str, Any]:
        """The documented default (``TrainConfig`` or the loss's own) of each parameter the space
        admits; parameters whose default lies outside the space are left to the sampler."""
        documented = TrainConfig().to_mapping()
        return {key: documented[key] for key, param in self.params.items() if param.admits(documented[key])}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able definition: a study stores it, so its workers need no space file."""
        return {"name": self.name, "path": str(self.path), "description": self.description, "fixed": dict(self.fixed),
                "params": {k: {**asdict(p), "choices": list(p.choices)} for k, p in self.params.items()},
                "min_weight_std": self.min_weight_std}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SearchSpace":
        params = {k: Param(**{**p, "choices": tuple(p["choices"])}) for k, p in data["params"].items()}
        return cls(name=data["name"], path=Path(data["path"]), description=data["description"],
                   fixed=dict(data["fixed"]), params=params, min_weight_std=data.get("min_weight_std", 0.0))

    @property
    def digest(self) -> str:
        """Identifies the space's content, so a study notices when its space file changed."""
        # min_weight_std is left out: a study stores the value it was created with (a setting)
        content = {"fixed": self.fixed, "params": {k: vars(p) for k, p in sorted(self.params.items())}}
        return hashlib.sha256(json.dumps(content, sort_keys=True, default=list).encode()).hexdigest()[:16]


def available_spaces(folder: Path = SPACES_DIR) -> list[str]:
    """Space names: files of the folder and of its subfolders (``finetune/debias``)."""
    return sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml")
                  if not p.stem.startswith("_"))


def _number(value: Any, where: str, what: str, integer: bool) -> float | int:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or (not integer and not math.isfinite(value)):
        raise UserError(f"{where}: '{what}' must be {'an integer' if integer else 'a number'}, got {value!r}")
    return value


def _parse_param(key: str, spec: Any, where: str) -> Param:
    if not isinstance(spec, dict) or "type" not in spec:
        raise UserError(f"{where}: expected a mapping with 'type' (float, int or categorical)")
    kind = spec["type"]
    if kind not in PARAM_KEYS:
        raise UserError(f"{where}: type must be float, int or categorical, got {kind!r}")
    extra = set(spec) - PARAM_KEYS[kind]
    if extra:
        raise UserError(f"{where}: unknown field '{sorted(extra)[0]}' for a {kind} parameter")
    field_type = kind_of(setting_fields()[key])
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}: 'choices' must be a non-empty list")
        checked = tuple(coerce_value(key, c, where) for c in choices)
        if len(set(checked)) != len(checked):
            raise UserError(f"{where}: 'choices' repeats a value")
        return Param(key, kind, choices=checked)
    if field_type != kind and not (kind == "int" and field_type == "float"):
        raise UserError(f"{where}: {key} is a {field_type} setting, not {kind}")
    integer = kind == "int"
    for name in ("low", "high"):
        if name not in spec:
            raise UserError(f"{where}: '{name}' is required")
    low, high = _number(spec["low"], where, "low", integer), _number(spec["high"], where, "high", integer)
    if not low < high:
        raise UserError(f"{where}: needs low < high, got low={low}, high={high}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{where}: 'log' must be true or false")
    if log and low <= 0:
        raise UserError(f"{where}: a log scale needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        step = _number(step, where, "step", integer)
        if step <= 0 or log:
            raise UserError(f"{where}: 'step' must be positive and cannot be combined with log")
    for bound in (low, high):
        coerce_value(key, float(bound) if kind == "float" else bound, where)
    return Param(key, kind, low=float(low) if kind == "float" else low, high=float(high) if kind == "float" else high,
                 log=log, step=step)


def _read_layer(path: Path, seen: tuple[Path, ...]) -> tuple[str, dict, dict, float]:
    """(description, fixed, params-specs, min_weight_std) of a file, with its ``extends`` chain
    merged under it."""
    if path in seen:
        raise UserError(f"{path}: 'extends' forms a cycle")
    data = read_yaml_mapping(path)
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise UserError(f"{path}: unknown key '{sorted(unknown)[0]}' (expected {', '.join(sorted(TOP_KEYS))})")
    fixed, params, min_weight_std = {}, {}, 0.0
    if "extends" in data:
        base = data["extends"]
        if not isinstance(base, str) or not (path.parent / f"{base}.yaml").is_file():
            raise UserError(f"{path}: extends: no file {base}.yaml next to it")
        _, fixed, params, min_weight_std = _read_layer(path.parent / f"{base}.yaml", seen + (path,))
    for section in ("fixed", "params"):
        value = data.get(section, {}) or {}
        if not isinstance(value, dict):
            raise UserError(f"{path}: '{section}' must be a mapping")
    fixed = {**fixed, **(data.get("fixed") or {})}
    params = {**params, **(data.get("params") or {})}
    if "min_weight_std" in data:
        min_weight_std = check_min_weight_std(data["min_weight_std"], f"{path}: min_weight_std")
    return str(data.get("description", "")), fixed, params, min_weight_std


def check_min_weight_std(value: Any, where: str) -> float:
    value = _number(value, where, "min_weight_std", integer=False)
    if value < 0:
        raise UserError(f"{where}: must be at least 0, got {value}")
    return float(value)


def load_space(name_or_path: str, folder: Path = SPACES_DIR) -> SearchSpace:
    """A space by name (``search_spaces/<name>.yaml``) or by path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = folder / f"{name_or_path}.yaml"
        if not path.is_file():
            raise UserError(f"unknown search space '{name_or_path}' (available: {', '.join(available_spaces(folder))})")
    elif not path.is_file():
        raise UserError(f"{path}: search space file not found")
    description, fixed_raw, params_raw, min_weight_std = _read_layer(path, ())
    fixed = {}
    known = setting_fields()
    for section, keys in (("fixed", fixed_raw), ("params", params_raw)):
        for key in keys:
            if key not in known:
                raise UserError(unknown_key_message(key, f"{path}: {section}"))
    for key, value in fixed_raw.items():
        fixed[key] = coerce_value(key, value, f"{path}: fixed.{key}")
    params = {key: _parse_param(key, spec, f"{path}: params.{key}") for key, spec in params_raw.items()}
    both = set(fixed) & set(params)
    if both:
        raise UserError(f"{path}: '{sorted(both)[0]}' is both fixed and a searched parameter")
    if not params:
        raise UserError(f"{path}: no params to search")
    return SearchSpace(name=space_name(path, folder), path=path, description=description, fixed=fixed, params=params,
                       min_weight_std=min_weight_std)


def space_name(path: Path, folder: Path) -> str:
    """A space's name, which is also its study's default name: the file's stem, prefixed with its
    subfolder of the spaces folder (``finetune/debias`` is ``finetune-debias``, not ``debias``)."""
    try:
        relative = Path(os.path.abspath(path)).relative_to(os.path.abspath(folder))
    except ValueError:
        return path.stem
    return "-".join(relative.with_suffix("").parts)
