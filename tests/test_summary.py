"""Typed evaluation summaries (reporting/summary.py): summary.json reads and writes
back unchanged, for this version and 0.2.0; a file that is no summary fails with a
message naming it; the report and the benchmark draw their tables with one builder."""

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from maediff.config import get_preset
from maediff.evaluation.protocol import EvalSettings
from maediff.models import build_model
from maediff.reporting.comparison import comparison_table
from maediff.reporting.runs import load_summary, report_table, table_rows, write_report
from maediff.reporting.summary import (
    EvaluationSummary,
    as_summary,
    curve_key,
    split_curve_key,
)
from maediff.reporting.tables import TABLE_COLUMNS, MetricTable, build_table, dataset_columns
from test_protocol_parity import IdentityModel, _evaluate, write_layout

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "v0.2.0" / "eval"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """An evaluation written by the pipeline (Thresh on a tiny layout, every data set)."""
    root = tmp_path_factory.mktemp("summary")
    write_layout(root / "data", n_val=1, n_test=2, n_ixi=1, empty_seg_test=True)
    thresh = build_model(replace(get_preset("thresh"), data=IdentityModel().cfg.data))
    returned = _evaluate(thresh, root / "data", root / "eval", label="Thresh")
    return root / "eval", returned


def test_a_written_summary_reads_and_writes_back_unchanged(written):
    folder, returned = written
    text = (folder / "summary.json").read_text()
    raw = json.loads(text)
    s = EvaluationSummary.read(folder)
    assert s.to_json() == raw
    assert json.dumps(s.to_json(), indent=2) == text  # same keys, same order
    assert isinstance(returned, EvaluationSummary) and returned.to_json() == raw  # evaluate_model's
    assert s.folder == folder.resolve()
    # typed attributes hold what the file says
    b = s.datasets["Brats21"]
    assert s.model == "Thresh" and s.checkpoint is None and s.fold == 0
    assert b.threshold == raw["datasets"]["Brats21"]["threshold"] and b.has_threshold
    assert b.metrics["dice"].mean == raw["datasets"]["Brats21"]["metrics"]["dice"]["mean"]
    assert b.excluded["auprc"].n == 1  # the test volume without lesion voxels
    assert b.lesions is not None and b.lesions.lesions >= 1
    assert [x.band for x in b.lesions.by_volume_load][0] == "0-0.1 ml"
    assert s.healthy is s.datasets["IXI"] and not s.healthy.has_threshold
    assert set(s.anomaly) == {"Brats21", "MSLUB"}
    assert s.settings == EvalSettings() and s.settings_absent == frozenset()
    assert s.scoring is not None and s.scoring.workers == 0
    assert s.figures is not None and s.figures.dice_vs_volume == "dice_vs_volume.png"
    assert all((folder / n).exists() for n in s.figures.names())
    assert s.mean("MSLUB", "dice") == raw["datasets"]["MSLUB"]["metrics"]["dice"]["mean"]
    assert s.mean("nowhere", "dice") is None and b.mean("no such metric") is None


def test_a_0_2_0_summary_reads_and_writes_back_unchanged():
    text = (FIXTURE / "summary.json").read_text()
    s = load_summary(FIXTURE)
    assert s.to_json() == json.loads(text)
    assert json.dumps(s.to_json(), indent=2) == text
    # what 0.2.0 did not write reads as None, and stays out of the file
    assert all(d.lesions is None for d in s.datasets.values())
    assert s.scoring is None and s.figures.dice_vs_volume is None
    assert s.settings_absent == {"lesion_overlap"}
    assert s.settings.lesion_overlap == EvalSettings().lesion_overlap
    assert s.datasets["Brats21"].threshold == pytest.approx(0.09135134721873328)


def test_every_field_of_the_settings_is_written(written):
    raw = json.loads((written[0] / "summary.json").read_text())
    # all but normative scoring's normaliser, which scoring.normative records
    assert list(raw["settings"]) == [k for k in EvalSettings().__dict__ if k != "normaliser"]


def test_a_file_that_is_no_summary_is_named_in_the_error(tmp_path):
    with pytest.raises(ValueError, match="holds no summary.json"):
        load_summary(tmp_path / "missing")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json is not valid JSON"):
        EvaluationSummary.read(bad)

    good = json.loads((FIXTURE / "summary.json").read_text())

    def fails(mutate, pattern):
        d = json.loads(json.dumps(good))
        mutate(d)
        f = tmp_path / "eval" / "summary.json"
        f.parent.mkdir(exist_ok=True)
        f.write_text(json.dumps(d))
        with pytest.raises(ValueError, match=pattern) as e:
            load_summary(f.parent)
        assert str(f) in str(e.value)

    fails(lambda d: d.pop("datasets"), "has no 'datasets'")
    fails(lambda d: d.pop("model"), "has no 'model'")
    fails(lambda d: d["datasets"]["Brats21"].pop("metrics"), "datasets.Brats21 has no 'metrics'")
    fails(
        lambda d: d["datasets"]["MSLUB"]["metrics"]["dice"].pop("mean"),
        "datasets.MSLUB.metrics.dice has no 'mean'",
    )
    fails(
        lambda d: d["datasets"]["IXI"]["metrics"]["l1"].update(mean="high"),
        "datasets.IXI.metrics.l1.mean is not a number",
    )
    fails(lambda d: d.update(datasets=[1, 2]), "datasets is not a JSON object")
    f = tmp_path / "list.json"
    f.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        EvaluationSummary.read(f)


def test_curve_keys_round_trip():
    key = curve_key("U-Net + Att. + MAE Brats21", "scores")
    assert key == "U-Net + Att. + MAE Brats21|scores"
    assert split_curve_key(key, ["MSLUB", "Brats21"]) == ("Brats21", "scores")
    with pytest.raises(ValueError):
        curve_key("M Brats21", "dice")
    with pytest.raises(ValueError):
        split_curve_key("M Brats21", ["Brats21"])


def _stats(v):
    return {"mean": v, "std": 0.3, "n": 3}  # the std over the run's volumes


def _run(model, brats, ms, l1, data="data"):
    m = _stats
    return {
        "model": model,
        "data_dir": data,
        "fold": 0,
        "datasets": {
            "Brats21": {"threshold": 0.1, "metrics": {"dice": m(brats), "auprc": m(brats / 2)}},
            "MSLUB": {"threshold": 0.1, "metrics": {"dice": m(ms), "auprc": m(ms / 2)}},
            "IXI": {"metrics": {"l1": m(l1)}},
        },
    }


RUNS = {
    "MAEDiff": [_run("MAEDiff", 0.40, 0.02, 0.09), _run("MAEDiff", 0.44, 0.01, 0.08)],
    "Thresh": [_run("Thresh", 0.30, 0.0, 0.17)] * 3,
    "AE": [_run("AE", 0.35, 0.015, 0.088)],
}


def _numbers(md: str) -> dict[str, list[str]]:
    """Row name -> the cells of its metric columns, marks removed."""
    out = {}
    for line in md.strip().splitlines()[2:]:
        cells = [re.sub(r"\*\*|</?u>", "", c).strip() for c in line.strip("|").split("|")]
        name = re.sub(r" \(\d+ runs\)$", "", cells[0])
        out[name] = cells[-5:]
    return out


def test_report_and_benchmark_tables_come_from_one_builder(tmp_path):
    summaries = [s for runs in RUNS.values() for s in runs]
    report = report_table(summaries)
    bench = comparison_table(RUNS)
    assert isinstance(report, MetricTable) and isinstance(bench, MetricTable)
    assert [c[:2] for c in report.columns] == [c[:2] for c in TABLE_COLUMNS]
    assert report.labels == bench.labels == list(RUNS) and report.runs == bench.runs == [2, 3, 1]
    np.testing.assert_array_equal(report.values, bench.values)
    want = build_table(RUNS.items(), TABLE_COLUMNS)
    np.testing.assert_array_equal(want.values, bench.values)
    # over runs (40 and 44), not volumes; the sample sd: sqrt(((-2)² + 2²) / (2 - 1))
    assert bench.values[0, 0].tolist() == pytest.approx([42.0, 8**0.5])

    write_report(summaries, tmp_path / "report")
    from_report = _numbers((tmp_path / "report" / "results.md").read_text())
    from_bench = _numbers(bench.markdown())
    assert from_report == from_bench
    # one run: its mean alone (the std over volumes is no spread over runs); identical
    # runs: a spread of 0 over them, in both tables
    assert from_report["AE"] == ["35.00", "17.50", "1.50", "0.75", "88.00"]
    assert from_report["Thresh"][0] == "30.00 ± 0.00"
    assert from_report["MAEDiff"][0] == "42.00 ± 2.83"
    assert "| MAEDiff (2 runs) |" in (tmp_path / "report" / "results.md").read_text()
    assert "| MAEDiff | 2 | **42.00 ± 2.83** |" in bench.markdown()
    # the compatible dict rows are the same numbers, unscaled
    rows, datasets = table_rows(summaries)
    assert datasets == ["Brats21", "MSLUB", "IXI"]
    assert rows[0]["Brats21"]["dice"] == {
        "mean": pytest.approx(0.42),
        "std": pytest.approx(0.02 * 2**0.5),
        "n": 2,
    }


def test_a_cell_says_how_many_runs_have_a_value():
    partial = json.loads(json.dumps(RUNS["MAEDiff"][0]))
    del partial["datasets"]["MSLUB"]
    t = build_table([("MAEDiff", [RUNS["MAEDiff"][1], partial])], TABLE_COLUMNS)
    assert t.text(0, 0) == "42.00 ± 2.83"
    assert t.text(0, 2) == "1.00 (n=1)"


def test_the_report_shows_data_sets_of_other_names():
    s = as_summary(_run("M", 0.4, 0.0, 0.1))
    s.datasets = {"TinyHospital": s.datasets["Brats21"], "IXI": s.datasets["IXI"]}
    t = report_table([s])
    assert [c.header for c in t.columns] == [
        "TinyHospital Dice (%)",
        "TinyHospital AUPRC (%)",
        "IXI l1 (1e-3)",
    ]
    assert t.columns == dataset_columns(["TinyHospital"], ["IXI"])
    assert t.markdown(runs="label").splitlines()[2] == "| M | 40.00 | 20.00 | 100.00 |"
