"""Search space files: the shipped spaces and every kind of bad file."""

import optuna
import pytest

from clipse.config import TrainConfig
from clipse.search.spaces import SPACES_DIR, available_spaces, load_space
from clipse.util.errors import UserError

DOCUMENTED = {  # docs/reference/losses.md: the search spaces must cover at least these ranges
    "debias": {"alpha": (0.1, 0.3), "delta": (0.2, 0.5), "lambda": (0.5, 2.0)},
    "bandpass": {"alpha": (0.1, 0.2), "m1": (0.1, 0.3), "m2": (0.8, 0.9), "gamma": (0.5, 1.0)},
}


def test_shipped_spaces():
    assert {"baseline", "debias", "bandpass"} <= set(available_spaces())
    assert "_shared" not in available_spaces()
    losses = {name: load_space(name).fixed["loss"] for name in ("baseline", "debias", "bandpass")}
    assert losses == {"baseline": "infonce", "debias": "sanw_debias", "bandpass": "sanw_bandpass"}


@pytest.mark.parametrize("space,ranges", DOCUMENTED.items())
@pytest.mark.parametrize("folder", ["", "finetune/"])
def test_spaces_cover_documented_ranges(space, ranges, folder):
    params = load_space(folder + space).params
    for key, (low, high) in ranges.items():
        assert params[key].covers(low, high), (space, key)


def test_fine_tuning_spaces_suit_a_pretrained_model():
    """Learning rates around 1e-5 with a warm-up; the checkpoint's temperature, not a searched one;
    the same training settings for every loss; their studies named apart from the scratch ones."""
    shared = load_space("finetune/baseline").params
    assert shared["lr"].covers(1e-6, 5e-5) and shared["lr"].high <= 1e-4 and shared["lr"].log
    assert shared["warmup_epochs"].covers(0.0, 1.0) and "init_temperature" not in shared
    for loss, name in (("infonce", "baseline"), ("sanw_debias", "debias"), ("sanw_bandpass", "bandpass")):
        space = load_space(f"finetune/{name}")
        assert space.fixed["loss"] == loss and space.name == f"finetune-{name}"
        assert {k: space.params[k] for k in shared} == shared


def test_every_loss_gets_the_same_training_parameters():
    shared = {k: v for k, v in load_space("baseline").params.items()}
    assert {"lr", "weight_decay"} <= set(shared)
    for name in ("debias", "bandpass"):
        params = load_space(name).params
        assert {k: params[k] for k in shared} == shared


def test_suggest_builds_valid_configs():
    for name in available_spaces():
        space = load_space(name)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(20):
            values = space.suggest(study.ask())
            TrainConfig.from_mapping(values, name).validate()


def write(tmp_path, text, name="space.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text,message", [
    ("params:\n  lr: {type: float, low: 0.1, high: 0.01}\n", "params.lr: needs low < high"),
    ("params:\n  lr: {type: float, low: 0.0, high: 0.1, log: true}\n", "params.lr: a log scale needs low > 0"),
    ("params:\n  lr_rate: {type: float, low: 0.1, high: 1}\n", "params: unknown setting 'lr_rate'"),
    ("params:\n  lr: {type: uniform, low: 0.1, high: 1}\n", "params.lr: type must be float, int or categorical"),
    ("params:\n  lr: {type: float, low: 0.1}\n", "params.lr: 'high' is required"),
    ("params:\n  lr: {type: float, low: a, high: 1}\n", "params.lr: 'low' must be a number"),
    ("params:\n  lr: {type: float, low: 0.1, high: 1, spread: 2}\n", "params.lr: unknown field 'spread'"),
    ("params:\n  epochs: {type: float, low: 1, high: 3}\n", "params.epochs: epochs is a int setting, not float"),
    ("params:\n  topical_batching: {type: categorical, choices: []}\n", "'choices' must be a non-empty list"),
    ("params:\n  loss: {type: categorical, choices: [infonce, hinge]}\n", "'loss' must be one of"),
    ("fixed:\n  loss: sanw_debias\nparams:\n  loss: {type: categorical, choices: [infonce]}\n",
     "'loss' is both fixed and a searched parameter"),
    ("extends: nothing\nparams: {}\n", "extends: no file nothing.yaml"),
    ("fixed:\n  alpha: high\nparams:\n  lr: {type: float, low: 0.1, high: 1}\n", "fixed.alpha: 'alpha' must be float"),
    ("params: {}\n", "no params to search"),
    ("fixed: [1, 2]\n", "'fixed' must be a mapping"),
    ("paramz: {}\n", "unknown key 'paramz'"),
    ("params:\n  lr: {type: float, low: 0.1, high: [1\n", "not valid YAML"),
    ("min_weight_std: -0.1\nparams:\n  lr: {type: float, low: 0.1, high: 1}\n", "min_weight_std: must be at least 0"),
    ("min_weight_std: lots\nparams:\n  lr: {type: float, low: 0.1, high: 1}\n", "'min_weight_std' must be a number"),
])
def test_bad_space_files_name_file_key_and_problem(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_space(path)
    assert str(tmp_path) in str(info.value) and message in str(info.value)


def test_unknown_space_lists_available():
    with pytest.raises(UserError, match=r"unknown search space 'bandpas' \(available: bandpass, baseline, dcl, debias"):
        load_space("bandpas")


def test_extends_merges_and_digest_tracks_content(tmp_path):
    write(tmp_path, "params:\n  lr: {type: float, low: 0.001, high: 0.01, log: true}\n", "_base.yaml")
    first = load_space(write(tmp_path, "extends: _base\nfixed: {loss: sanw_debias}\n"
                                       "params:\n  alpha: {type: float, low: 0.1, high: 0.3}\n"))
    assert set(first.params) == {"lr", "alpha"} and first.fixed == {"loss": "sanw_debias"}
    second = load_space(write(tmp_path, "extends: _base\nfixed: {loss: sanw_debias}\n"
                                        "params:\n  alpha: {type: float, low: 0.1, high: 0.4}\n"))
    assert first.digest != second.digest
    assert SPACES_DIR.name == "search_spaces"


def test_a_weight_floor_is_inherited_and_overridden(tmp_path):
    write(tmp_path, "min_weight_std: 0.02\nparams:\n  lr: {type: float, low: 0.001, high: 0.01}\n", "_floor.yaml")
    inherited = load_space(write(tmp_path, "extends: _floor\nfixed: {loss: sanw_debias}\n", "a.yaml"))
    overridden = load_space(write(tmp_path, "extends: _floor\nmin_weight_std: 0.05\nfixed: {loss: sanw_debias}\n",
                                  "b.yaml"))
    assert inherited.min_weight_std == 0.02 and overridden.min_weight_std == 0.05
    assert inherited.digest == overridden.digest  # a study stores its own value: older studies still resume
    assert type(inherited).from_dict(inherited.to_dict()) == inherited
    assert load_space("baseline").min_weight_std == 0.0
