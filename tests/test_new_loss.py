"""A loss defined only here, plus a space file written here, trains and is searched: adding a
loss needs no edit anywhere else in clipse."""

import dataclasses
from pathlib import Path

import pytest
import torch

from clipse.config import TrainConfig
from clipse.losses import (
    LOSSES,
    ContrastiveLoss,
    loss_param,
    register_loss,
    weighted_infonce,
)
from clipse.losses.sanw import affinity, mass_preserving, weight_stats
from clipse.runs.folder import read_csv
from clipse.search.command import SearchOptions, run_search
from clipse.train import build_parser, config_from_args
from clipse.training import train
from clipse.util.errors import UserError


@dataclasses.dataclass(frozen=True)
class HardestNegatives(ContrastiveLoss):
    """Negatives above the ``quantile`` of their row's affinity weigh ``1 + boost``."""

    boost: float = loss_param(1.0, "extra weight of the hardest negatives")
    quantile: float = loss_param(0.75, "affinity quantile above which a negative counts as hard")

    name = "hardest_negatives"
    strength = "boost"

    def problems(self):
        return [] if 0 < self.quantile < 1 else [f"quantile={self.quantile}: needs 0 < quantile < 1"]

    def __call__(self, image_emb, text_emb, scale):
        aff = affinity(image_emb, text_emb)
        cut = torch.quantile(aff, self.quantile, dim=1, keepdim=True)
        weights = mass_preserving(1.0 + self.boost * (aff > cut).float())
        return weighted_infonce(image_emb, text_emb, scale, weights), weight_stats(weights, aff)


@pytest.fixture
def new_loss():
    register_loss(HardestNegatives)
    yield HardestNegatives
    LOSSES.pop(HardestNegatives.name)


def test_the_new_loss_is_a_setting_like_the_others(new_loss):
    config = TrainConfig.from_mapping({"loss": "hardest_negatives", "boost": 2}, "test")
    assert config.loss_function() == HardestNegatives(boost=2.0, quantile=0.75)
    assert config.to_mapping()["boost"] == 2.0 and config.to_mapping()["quantile"] == 0.75
    args = build_parser().parse_args(["--loss", "hardest_negatives", "--quantile", "0.5"])
    assert config_from_args(args).loss_function() == HardestNegatives(boost=1.0, quantile=0.5)
    with pytest.raises(UserError, match="quantile=1.5: needs 0 < quantile < 1"):
        config.replace(loss_params={**config.loss_params, "quantile": 1.5}).validate()
    with pytest.raises(ValueError, match="quantile=1.5"):  # the same rule, for direct callers
        HardestNegatives(quantile=1.5).checked()


def test_a_shared_key_must_agree_with_the_losses_that_have_it():
    @dataclasses.dataclass(frozen=True)
    class OtherAlpha(ContrastiveLoss):
        alpha: float = loss_param(0.9, "strength with another default")
        name = "other_alpha"

    with pytest.raises(ValueError, match="parameter 'alpha' differs"):
        register_loss(OtherAlpha)
    assert "other_alpha" not in LOSSES


def test_the_new_loss_trains_with_its_warm_up(new_loss, tiny):
    config = tiny(loss="hardest_negatives", boost=3.0, alpha_warmup_epochs=2.0, log_every=1)
    result = train(config)
    assert result.status == "completed"
    steps = read_csv(Path(config.run_dir) / "training.csv")
    strengths = [float(row["alpha"]) for row in steps]  # the strength column, ramped from 0
    assert strengths[0] == pytest.approx(3.0 / 30) and strengths[-1] == pytest.approx(3.0)
    assert float(steps[-1]["weight_std"]) > 0  # it really reweights


@pytest.mark.slow
def test_the_new_loss_is_searched_from_its_space_file(new_loss, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    space = tmp_path / "hardest.yaml"
    space.write_text("fixed: {loss: hardest_negatives}\nparams:\n"
                     "  boost: {type: float, low: 0.5, high: 4.0}\n  quantile: {type: float, low: 0.5, high: 0.9}\n")
    result = run_search(SearchOptions(space=str(space), trials=2, studies_dir=tmp_path / "studies", training={
        "pretrained": "none", "shapes_train_images": 48, "shapes_val_images": 12, "shapes_test_images": 12, "batch_size": 16,
        "epochs": 1, "data_root": str(tmp_path / "shapes")}))
    assert result.counts.complete == 2
    assert all({"boost", "quantile"} == {k for k in row if k in ("boost", "quantile")} for row in result.top)


def test_what_is_not_a_loss_or_takes_a_known_name_is_refused():
    class NotADataclass(ContrastiveLoss):
        name = "not_a_dataclass"

    @dataclasses.dataclass(frozen=True)
    class NotALoss:
        name = "not_a_loss"

    for cls in (NotADataclass, NotALoss):
        with pytest.raises(TypeError, match="a loss is a dataclass subclassing ContrastiveLoss"):
            register_loss(cls)

    @dataclasses.dataclass(frozen=True)
    class Impostor(ContrastiveLoss):
        name = "infonce"

    with pytest.raises(ValueError, match="^a loss named 'infonce' is already registered$"):
        register_loss(Impostor)
    assert LOSSES["infonce"] is not Impostor
    assert register_loss(LOSSES["infonce"]) is LOSSES["infonce"]  # registering the same class again is harmless
