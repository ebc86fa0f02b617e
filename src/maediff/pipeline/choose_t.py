"""The test noise level t_test chosen on validation, never on test (docs/evaluation.md
§Choosing t_test).

The paper fixes t_test = 500. Like the threshold, t_test is a test-time choice that a
model trained for another budget or recipe may want different; choosing it on the test
volumes would leak test labels into the result. `choose_t_test` reconstructs the
unhealthy validation volumes of every data set at each candidate t (the protocol's
full pass, the same noise seed as the evaluation), runs the protocol's threshold
search on them and keeps the t with the highest mean pooled validation Dice over the
data sets (ties: the candidate nearest the configured t_test, then the smaller). The
evaluation then runs at that t, and records the choice in summary.json
(`scoring.t_choice`); `detect --threshold-from` that evaluation reuses it. Given the
evaluation's `Reconstructions` (volumes.py), the validation volumes of the chosen t stay
held there, so the evaluation does not reconstruct them again (those of a candidate
that loses are dropped: at most two candidates' volumes are held at a time).

    choice = choose_t_test(model, plan, data_cfg, (300, 400, 500, 600), seed=0)
    model = with_t_test(model, choice.chosen)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from tqdm.auto import tqdm

from ..config import DataConfig
from ..data.splits import Subject
from ..evaluation.protocol import EvalSettings, VolumeResult, evaluate_split
from .volumes import Reconstructions

if TYPE_CHECKING:
    from ..models import AnomalyModel


class ValidationPlan(Protocol):
    """What the choice reads of an evaluation's plan (evaluate.EvalPlan): per data set
    its (validation, test) subjects."""

    anomaly: dict[str, tuple[list[Subject], list[Subject]]]


T_TEST_KEY = "diffusion.t_test"  # the config key that the choice sets


@dataclass
class TChoice:
    """Candidates, each one's pooled validation Dice per data set, and the choice."""

    configured: int
    candidates: list[int]
    val_dice: dict[int, dict[str, float]] = field(default_factory=dict)
    chosen: int = 0

    def mean_dice(self, t: int) -> float:
        d = self.val_dice[t]
        return sum(d.values()) / len(d)

    def rank(self, t: int) -> tuple[float, int, int]:
        """The rule: the highest mean pooled validation Dice (to 1e-6: float noise is
        no difference), then the candidate nearest the configured t, then the smaller."""
        return round(self.mean_dice(t), 6), -abs(t - self.configured), -t

    def decide(self) -> int:
        self.chosen = max(self.candidates, key=self.rank)
        return self.chosen

    def to_json(self) -> dict[str, Any]:
        return {
            "configured": self.configured,
            "candidates": list(self.candidates),
            "val_dice": {str(t): d for t, d in self.val_dice.items()},
            "chosen": self.chosen,
            "rule": "highest mean pooled validation Dice over the data sets",
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TChoice:
        return cls(
            int(d["configured"]),
            [int(t) for t in d["candidates"]],
            {int(t): {k: float(v) for k, v in ds.items()} for t, ds in d["val_dice"].items()},
            int(d["chosen"]),
        )

    def override(self) -> str:
        """The choice as a config override of the model loaded again (detect
        --threshold-from an evaluation that chose t_test: its threshold belongs to maps
        made at that t)."""
        return f"{T_TEST_KEY}={self.chosen}"

    def describe(self) -> str:
        tried = ", ".join(f"{t}: {100 * self.mean_dice(t):.2f}" for t in self.candidates)
        return (
            f"t_test = {self.chosen}, chosen on validation (mean pooled validation Dice, %: "
            f"{tried}; configured {self.configured})"
        )


def check_candidates(model: AnomalyModel, candidates: Sequence[int]) -> list[int]:
    """The candidates, sorted and unique, after checking that the model has a t_test to
    choose and that each lies in 1..T."""
    span = model.t_test_range()
    if span is None:
        raise ValueError(f"model {model.cfg.model!r} has no diffusion t_test to choose")
    if model.cfg.inference.ensemble_t:
        raise ValueError(
            "inference.ensemble_t sets the noise levels itself; choose t_test without it"
        )
    ts = sorted({int(t) for t in candidates})
    if not ts:
        raise ValueError("give at least one candidate t")
    lo, hi = span
    bad = [t for t in ts if not lo <= t <= hi]
    if bad:
        raise ValueError(f"candidate t {bad} outside {lo}..{hi}")
    return ts


def with_t_test(model: AnomalyModel, t: int) -> AnomalyModel:
    """The same model (weights shared, in place) reconstructing at t_test = t."""
    model.set_t_test(t)
    return model


def choose_t_test(
    model: AnomalyModel,
    plan: ValidationPlan,
    data_cfg: DataConfig,
    candidates: Sequence[int],
    seed: int = 0,
    settings: EvalSettings = EvalSettings(),
    progress: bool = True,
    volumes: Reconstructions | None = None,
) -> TChoice:
    """Pick t_test on the validation volumes of `plan` (module docstring). The model is
    left at its configured t_test; apply the choice with `with_t_test`. `volumes` (of
    this model, data_cfg and seed) keeps the chosen t's validation volumes."""
    ts = check_candidates(model, candidates)
    configured = model.t_test
    choice = TChoice(configured, ts)
    volumes = volumes if volumes is not None else Reconstructions(model, data_cfg, seed)
    best: int | None = None
    n = sum(len(val) for val, _ in plan.anomaly.values())
    bar = tqdm(total=n * len(ts), desc="choosing t_test", unit="vol", disable=not progress)
    try:
        for t in ts:
            with_t_test(model, t)
            choice.val_dice[t] = {}
            for ds, (val, _) in plan.anomaly.items():
                vols = []
                for s in val:
                    name, image, brain, seg, rec, affine = volumes.get(s, keep=True)
                    vols.append(VolumeResult(name, image, rec, brain, seg, affine, []))
                    bar.update()
                outcome = evaluate_split(vols, [], settings)
                choice.val_dice[t][ds] = float(outcome.val_dice)
            if best is None or choice.rank(t) > choice.rank(best):  # t leads: keep its volumes
                best, lost = t, best
            else:
                lost = t
            if lost is not None:
                volumes.forget(lost)
    finally:
        with_t_test(model, configured)
        bar.close()
    choice.decide()
    return choice


__all__ = ["T_TEST_KEY", "TChoice", "check_candidates", "choose_t_test", "with_t_test"]
