"""What a contrastive loss is to the rest of clipse, and the registry that finds losses by name.

A loss is a frozen dataclass subclassing ``ContrastiveLoss``: its fields are its parameters
(made with ``loss_param``, which gives each its default, help text and flag), ``problems``
states its validity rules once, and calling it on a batch returns ``(loss, stats)``.
``@register_loss`` makes it known under its ``name``: ``--loss NAME`` accepts it, its
parameters become flags, YAML keys and search-space keys, and ``TrainConfig.validate`` applies
its rules. Nothing else names a loss parameter (see ``docs/architecture.md``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import Field
from typing import Any, ClassVar, Mapping

import torch

from clipse.util.fields import default_of, key_of, kind_of, setting

LossResult = tuple[torch.Tensor, dict[str, torch.Tensor]]

# A negative is "suppressed" when its weight is below this (docs/reference/losses.md).
SUPPRESSED_BELOW = 0.9

# The training.csv column holding the strength a step used (SANW's alpha during its warm-up).
STRENGTH_COLUMN = "alpha"


def loss_param(default: Any, help: str, *, key: str | None = None) -> Any:
    """A loss parameter: its default and help text; ``key`` when users write it otherwise than
    the attribute (``lambda`` for ``lam``)."""
    return setting(default, help, key=key)  # pragma: no mutate (runs when a loss class is defined, at import)


# Where an affinity may come from (``--affinity``; each built by ``clipse.training.affinity``).
AFFINITY_SOURCES = ("online", "frozen", "ema", "truth")


@dataclasses.dataclass(frozen=True)
class Reference:
    """Where a loss takes its affinity from when not from the embeddings it trains
    (``--affinity``, ``clipse.training.affinity``): a teacher's L2-normalised embeddings of the same
    batch (``image``, ``text``), or a given (B, B) affinity (``matrix``: the data's ground truth)."""

    image: torch.Tensor | None = None
    text: torch.Tensor | None = None
    matrix: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class ContrastiveLoss:
    """Base of every loss. Subclasses are frozen dataclasses of their parameters."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    # The parameter the strength warm-up ramps from 0 (None: the loss has no strength).
    strength: ClassVar[str | None] = None
    # Whether it weighs negatives by an affinity (then --affinity says where that comes from).
    uses_affinity: ClassVar[bool] = False
    # Whether it takes the model's learnable logit bias (``prepare_model`` gives the model one).
    uses_logit_bias: ClassVar[bool] = False

    def prepare_model(self, model: torch.nn.Module) -> None:
        """Give the model what the loss trains besides its towers (called before the optimizer
        is built and before a resumed checkpoint is loaded)."""

    def __call__(self, image_emb: torch.Tensor, text_emb: torch.Tensor, scale,
                 reference: Reference | None = None) -> LossResult:
        """L2-normalised embeddings and the logit multiplier -> (scalar loss, 0-d stat tensors).
        A loss with an affinity takes it from ``reference`` where one is given."""
        raise NotImplementedError

    def compute(self, image_emb: torch.Tensor, text_emb: torch.Tensor, scale, with_stats: bool = True,
                false_negatives: torch.Tensor | None = None, reference: Reference | None = None,
                logit_bias: torch.Tensor | None = None) -> LossResult:
        """The loss and its statistics, which the trainer sums at every step it gets them. A loss
        whose statistics cost work the loss itself does not need may leave them out when
        ``with_stats`` is False (steps that write no row of training.csv). ``false_negatives``
        (B, B) bool, where the data knows them: [i, j] is True when caption j truly describes
        image i; the statistics then include ``false_negative_stats`` of the loss's weights.
        ``reference`` goes to the loss only when given, so a loss without an affinity may leave
        it out of its signature; ``logit_bias`` only to a loss that ``uses_logit_bias``."""
        given = {} if reference is None else {"reference": reference}
        bias = {"logit_bias": logit_bias} if self.uses_logit_bias else {}
        value, stats = self(image_emb, text_emb, scale, **given, **bias)
        if false_negatives is not None:
            weights = self.negative_weights(image_emb, text_emb, scale=scale, **given)
            stats = {**stats, **false_negative_stats(weights, false_negatives)}
        return value, stats

    def negative_weights(self, image_emb: torch.Tensor, text_emb: torch.Tensor, reference: Reference | None = None,
                         scale=1.0) -> torch.Tensor:
        """The (B, B) weight of every pair in the loss (1 on the diagonal); plain InfoNCE's are all 1.
        ``scale``: the logit multiplier, for weights that depend on the logits."""
        return torch.ones(image_emb.shape[0], text_emb.shape[0], device=image_emb.device)

    def problems(self) -> list[str]:
        """Why these parameter values cannot train; empty when they can."""
        return []

    def checked(self) -> "ContrastiveLoss":
        problems = self.problems()
        if problems:
            raise ValueError(f"{self.name}: " + "; ".join(problems))
        return self

    @property
    def strength_value(self) -> float:
        return float(getattr(self, self.strength)) if self.strength else 0.0

    def ramped(self, fraction: float) -> "ContrastiveLoss":
        """This loss with its strength scaled by ``fraction`` (clipped to [0, 1])."""
        if not self.strength or fraction >= 1.0:
            return self
        return dataclasses.replace(self, **{self.strength: self.strength_value * max(0.0, fraction)})

    @classmethod
    def parameters(cls) -> tuple[Field, ...]:
        return dataclasses.fields(cls)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "ContrastiveLoss":
        """This loss with its parameters taken from ``settings`` (keys as users write them)."""
        return cls(**{f.name: settings[key_of(f)] for f in cls.parameters() if key_of(f) in settings})


@torch.no_grad()
def false_negative_stats(weights: torch.Tensor, false_negatives: torch.Tensor) -> dict[str, torch.Tensor]:
    """Over the off-diagonal pairs of a batch: ``fn_share``, the share that are true false
    negatives; ``fn_recall``, the share of those weighted below SUPPRESSED_BELOW; ``fn_precision``,
    the share of pairs weighted below it that are true false negatives (NaN where nothing is
    counted). ``weights[i, j]`` weighs two negatives: caption j of image i (image -> text) and
    image j of caption i (text -> image, true when caption i describes image j); both count.
    0-d tensors from masked sums, so that the step does not wait for the device."""
    batch = weights.shape[0]
    off = ~torch.eye(batch, dtype=torch.bool, device=weights.device)
    truth = false_negatives.to(weights.device) & off       # [i, j]: caption j truly describes image i
    suppressed = (weights < SUPPRESSED_BELOW) & off
    true_pairs = truth.sum().float()                        # the same count in both directions
    caught = (truth & suppressed).sum().float() + (truth.T & suppressed).sum().float()
    return {"fn_share": true_pairs / max(1, batch * (batch - 1)),
            "fn_recall": caught / (2 * true_pairs),          # 0/0 = NaN: no false negative in the batch
            "fn_precision": caught / (2 * suppressed.sum().float())}


LOSSES: dict[str, type[ContrastiveLoss]] = {}


def register_loss(cls: type[ContrastiveLoss]) -> type[ContrastiveLoss]:
    """Class decorator: make a loss known under ``cls.name``. A parameter key that several
    losses share (``alpha``, ``rho``) must have the same type and default in all of them,
    because a configuration holds one value per key."""
    if "__dataclass_fields__" not in vars(cls) or not issubclass(cls, ContrastiveLoss):  # decorated itself
        raise TypeError(f"{cls!r}: a loss is a dataclass subclassing ContrastiveLoss")
    if cls.name in LOSSES and LOSSES[cls.name] is not cls:
        raise ValueError(f"a loss named '{cls.name}' is already registered")
    known = loss_parameters()
    for f in cls.parameters():
        other = known.get(key_of(f))
        if other is not None and (kind_of(other), default_of(other)) != (kind_of(f), default_of(f)):
            raise ValueError(f"loss '{cls.name}': parameter '{key_of(f)}' differs from the one other losses "
                             f"declare ({kind_of(f)} {default_of(f)!r} vs {kind_of(other)} {default_of(other)!r})")
    LOSSES[cls.name] = cls
    return cls


def loss_names() -> tuple[str, ...]:
    return tuple(LOSSES)


def loss_parameters() -> dict[str, Field]:
    """Every registered loss parameter by key, in registration order (shared keys once)."""
    out: dict[str, Field] = {}
    for cls in LOSSES.values():
        for f in cls.parameters():
            out.setdefault(key_of(f), f)
    return out


def loss_defaults() -> dict[str, Any]:
    return {key: default_of(f) for key, f in loss_parameters().items()}
