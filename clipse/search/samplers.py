"""The Optuna samplers a study can use (``--sampler``), each Optuna's own implementation.

A study stores the sampler's name; every worker builds a fresh sampler for each trial it asks
for (``build_sampler``), so that any process can continue any study. Samplers whose state
lives in the study (CMA-ES's generations, NSGA-II's populations, the grid's visited points,
the QMC sequence's position) pick it up from the storage; their per-trial seed moves with the
number of trials already in the study, so no two trials repeat a random draw. The QMC and grid
samplers keep the study's seed: the sequence's scrambling and the grid's shuffled order must be
the same for every trial, or points would repeat.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import optuna

from clipse.search.spaces import Param, SearchSpace
from clipse.util.errors import UserError


@dataclass(frozen=True)
class SamplerKind:
    help: str
    build: Callable[[int, int, SearchSpace], optuna.samplers.BaseSampler]  # (seed, startup trials, space)
    multi_objective: bool = True
    moving_seed: bool = True


def _tpe(seed: int, startup: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    # multivariate TPE models parameter interactions; the constant liar keeps parallel workers
    # from sampling the same point while trials are running
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=startup)


def _gp(seed: int, startup: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup)


def _cmaes(seed: int, startup: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    # categorical parameters are outside CMA-ES: Optuna samples them at random; pruned trials
    # count with their last reported value, or a pruned search would leave CMA-ES almost nothing
    return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=startup, warn_independent_sampling=False,
                                        consider_pruned_trials=True)


def _qmc(seed: int, startup: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed, warn_asynchronous_seeding=False)


def _nsga2(seed: int, startup: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(seed=seed)


def _random(seed: int, startup: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, without its ``study.stop()`` once the grid is covered: that works
    only inside ``study.optimize``, and clipse workers ask and tell. The search sets the study's
    total to the grid size instead."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def _grid(seed: int, startup: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    return _GridSampler(grid_values(space), seed=seed)


SAMPLER_KINDS: dict[str, SamplerKind] = {
    "tpe": SamplerKind("multivariate TPE with the constant liar (startup trials at random)", _tpe),
    "random": SamplerKind("independent uniform draws", _random),
    "gp": SamplerKind("Gaussian-process Bayesian optimisation (startup trials at random)", _gp),
    "cmaes": SamplerKind("CMA-ES on the numeric parameters (categorical ones drawn at random); one objective",
                         _cmaes, multi_objective=False),
    "qmc": SamplerKind("scrambled Sobol sequence: space-filling, no model", _qmc, moving_seed=False),
    "grid": SamplerKind("every point of the grid of categorical and stepped parameters; trials = grid size "
                        "unless --trials is smaller", _grid, moving_seed=False),
    "nsga2": SamplerKind("NSGA-II genetic algorithm (made for several objectives)", _nsga2),
}
SAMPLERS = tuple(SAMPLER_KINDS)
MAX_GRID_POINTS = 10_000  # every worker enumerates the whole grid for every trial it asks for


def build_sampler(name: str, seed: int, startup_trials: int, space: SearchSpace,
                  trials_so_far: int) -> optuna.samplers.BaseSampler:
    kind = SAMPLER_KINDS[name]
    trial_seed = (seed * 1_000_003 + trials_so_far if kind.moving_seed else seed) % 2**32  # numpy's seed range
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return kind.build(trial_seed, startup_trials, space)


def check_sampler(name: str, space: SearchSpace, objectives: int) -> None:
    """One line when the sampler cannot search this space or this many objectives."""
    if objectives > 1 and not SAMPLER_KINDS[name].multi_objective:
        able = [other for other, kind in SAMPLER_KINDS.items() if kind.multi_objective]
        raise UserError(f"--sampler {name} optimises one objective; for several use {', '.join(able)}")
    if name == "grid" and grid_size(space) > MAX_GRID_POINTS:
        raise UserError(f"--sampler grid: the space's grid has {grid_size(space):,} points (at most "
                        f"{MAX_GRID_POINTS:,}); coarsen the steps or use another sampler")


def _param_grid(param: Param) -> list[Any]:
    if param.type == "categorical":
        return list(param.choices)
    if param.type == "int":  # every integer (or every step) from low to high, on a log scale too
        return list(range(param.low, param.high + 1, param.step or 1))
    if param.step is None:
        raise UserError(f"--sampler grid: '{param.key}' is a continuous float; give it a step in the space "
                        "(or use another sampler)")
    count = math.floor((param.high - param.low) / param.step + 1e-9) + 1
    return [round(param.low + i * param.step, 12) for i in range(count)]


def grid_values(space: SearchSpace) -> dict[str, list[Any]]:
    """Each parameter's grid points: categorical choices, or low to high by the step."""
    return {key: _param_grid(param) for key, param in space.params.items()}


def grid_size(space: SearchSpace) -> int:
    return math.prod(len(values) for values in grid_values(space).values())
