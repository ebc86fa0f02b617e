"""t_test chosen on the validation volumes (pipeline/choose_t.py): never on test, the
choice recorded in summary.json and the report, and reused by detect."""

import re
from dataclasses import replace

import pytest

from maediff.config import get_preset
from maediff.models import build_model
from maediff.pipeline.choose_t import TChoice, check_candidates, choose_t_test, with_t_test


@pytest.fixture
def tiny_model(gen):
    from conftest import draw_zero_layers

    return draw_zero_layers(build_model(get_preset("maediff-tiny")), gen).eval()


def test_candidates_are_checked(tiny_model):
    assert check_candidates(tiny_model, [600, 200, 600]) == [200, 600]
    with pytest.raises(ValueError, match=r"outside 1\.\.1000"):
        check_candidates(tiny_model, [0, 500])
    with pytest.raises(ValueError, match="at least one"):
        check_candidates(tiny_model, [])
    ae = build_model(get_preset("ae-tiny"))
    with pytest.raises(ValueError, match="no diffusion t_test"):
        check_candidates(ae, [500])
    tiny_model.cfg = replace(
        tiny_model.cfg, inference=replace(tiny_model.cfg.inference, ensemble_t=(300, 500))
    )
    with pytest.raises(ValueError, match="ensemble_t"):
        check_candidates(tiny_model, [500])


def test_the_rule_takes_the_best_mean_then_the_nearest_to_the_configured_t():
    c = TChoice(500, [300, 400, 600], {300: {"a": 0.2, "b": 0.4}, 400: {"a": 0.3, "b": 0.3}})
    c.val_dice[600] = {"a": 0.1, "b": 0.1}
    assert c.mean_dice(300) == pytest.approx(0.3) == pytest.approx(c.mean_dice(400))
    assert c.decide() == 400 == c.chosen  # tied with 300 (to float noise), nearer 500
    c.val_dice[600] = {"a": 0.3, "b": 0.31}
    assert c.decide() == 600
    assert TChoice.from_json(c.to_json()) == c
    assert "t_test = 600, chosen on validation" in c.describe()


@pytest.mark.slow
def test_choice_reads_validation_only_and_matches_the_evaluation(tiny_bench, tiny_model, tmp_path):
    from maediff.data.io import Subject
    from maediff.pipeline.evaluate import evaluate_model, plan_evaluation
    from maediff.reporting.runs import load_summary

    plan = plan_evaluation(tiny_bench, healthy_test=False)
    # test volumes that do not exist: reading one would fail
    missing = Subject("ghost", tmp_path / "ghost.nii.gz", None, None)
    blind = type(plan)({ds: (val, [missing]) for ds, (val, _) in plan.anomaly.items()}, None)
    choice = choose_t_test(tiny_model, blind, tiny_model.cfg.data, [250, 500], progress=False)
    assert set(choice.val_dice) == {250, 500}
    assert choice.chosen == max((250, 500), key=choice.mean_dice)
    assert tiny_model.cfg.diffusion.t_test == 500  # left as configured

    out = tmp_path / "eval"
    s = evaluate_model(
        tiny_model,
        tiny_bench,
        out,
        t_candidates=[250, 500],
        healthy_test=False,
        progress=False,
        figures=False,
    )
    assert s.scoring.t_test == choice.chosen == s.scoring.t_choice["chosen"]
    # the evaluation at the chosen t finds the same pooled validation Dice
    for ds, d in s.datasets.items():
        found = float(re.search(r"pooled Dice ([0-9.]+)", d.threshold_source)[1])
        assert found == pytest.approx(choice.val_dice[choice.chosen][ds], abs=1e-4)
    assert load_summary(out).scoring.t_choice == s.scoring.t_choice
    from maediff.reporting.runs import write_report

    write_report([load_summary(out)], tmp_path / "report")
    assert "chosen on the validation volumes" in (tmp_path / "report" / "report.html").read_text()

    # detect --threshold-from that evaluation reconstructs at the chosen t
    from maediff.pipeline.thresholds import t_test_override

    assert t_test_override(str(out), None, []) == [f"diffusion.t_test={choice.chosen}"]
    assert t_test_override(str(out), None, ["diffusion.t_test=123"]) == []  # the user's own t
    assert t_test_override(str(out), 0.3, []) == []  # a number given: no evaluation's t


def test_with_t_test_changes_what_the_model_reconstructs_at(tiny_model):
    assert with_t_test(tiny_model, 321).ensemble_timesteps() == [321]


def test_each_volume_is_reconstructed_once_per_t(tiny_bench, tiny_model, tmp_path):
    """Choosing t_test and fitting normative scoring reconstruct validation volumes that
    the evaluation reads again at the same t: each (t, volume) is reconstructed once.
    The model's reconstruction is replaced by a cheap one that depends on t (the
    pipeline around it is the real one) and counts its calls."""
    import hashlib

    from maediff.pipeline.evaluate import evaluate_model

    calls = []

    def reconstruct(slices, generator=None, **_):
        t = tiny_model.cfg.diffusion.t_test
        calls.append((t, hashlib.sha1(slices.numpy().tobytes()).hexdigest()))
        return slices * (1 - t / 2000)

    tiny_model.reconstruct = reconstruct
    s = evaluate_model(
        tiny_model,
        tiny_bench,
        tmp_path / "e",
        t_candidates=[250, 500],
        scoring="normative",
        datasets=["MSLUB"],
        healthy_test=False,
        max_volumes=1,
        n_jobs=1,
        workers=0,
        progress=False,
        figures=False,
    )
    twice = [c for c in set(calls) if calls.count(c) > 1]
    assert not twice, f"reconstructed more than once at the same t: {twice}"
    chosen = s.scoring.t_choice["chosen"]
    assert len([c for c in calls if c[0] != chosen]) == 1  # the losing t: MSLUB val only
    # at the chosen t: MSLUB val and test, the healthy validation volume(s) of the
    # label-free thresholds and of the normative fit (the first one shared)
    assert s.scoring.normative["volumes"] >= 1 and list(s.datasets) == ["MSLUB"]
    assert len([c for c in calls if c[0] == chosen]) == 2 + s.scoring.normative["volumes"]
