"""`maediff benchmark` end to end on the tiny scale: runs, resume, refusal, tables,
Figure 3, and two processes filling one folder."""

import json
import shutil
import subprocess
import sys

import pytest

from maediff.cli import main
from maediff.evaluation.paired import paired_rows
from maediff.reporting.comparison import comparison_table

ARGS = [
    "--models",
    "thresh",
    "pddpm-s48",
    "--scale",
    "tiny",
    "--steps",
    "2",
    "--max-volumes",
    "1",
    "--device",
    "cpu",
    "-q",
]


@pytest.mark.slow
def test_benchmark_runs_resumes_and_refuses_changes(tiny_bench, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["benchmark", "--data", str(tiny_bench), "-o", str(out), "--seeds", "0", "1", *ARGS]
    assert main(argv) == 0
    for name in ("table.md", "table.csv", "figure3.png", "report.html"):
        assert (out / name).exists(), name
    assert not (out / "paired.md").exists()  # no MAEDiff among the models: nothing to pair with
    table = (out / "table.md").read_text()
    assert "| Thresh | 2 |" in table and "| pDDPM s48 | 2 |" in table
    free = (out / "labelfree.md").read_text()  # scan AUROC, Dice at FPR thresholds per run
    assert "scan AUROC" in free and free.count("| BraTS21 |") == 4
    assert "| pDDPM s48 fold0-seed1 | BraTS21 |" in free  # each run named by its row
    capsys.readouterr()
    assert main(argv) == 0  # everything finished: nothing is trained again
    assert capsys.readouterr().out.count(": done") == 4
    # an evaluation removed (a protocol change): evaluated again, its training time kept
    run = out / "runs" / "pddpm-s48" / "fold0-seed0"
    before = json.loads((run / "timing.json").read_text())
    shutil.rmtree(run / "eval")
    assert main(argv) == 0 and (run / "eval" / "summary.json").exists()
    after = json.loads((run / "timing.json").read_text())
    assert (after["train_steps"], after["train_s"]) == (before["train_steps"], before["train_s"])
    # a run killed in training (checkpoint saved, no summary) resumes: its saved
    # config holds the landmarks learned from the data, the benchmark's does not
    (run / "train" / "train_summary.json").unlink()
    shutil.rmtree(run / "eval")
    saved = (run / "train" / "config.yaml").read_text()
    assert "landmarks: []" not in saved
    assert main(argv) == 0 and (run / "train" / "train_summary.json").exists()
    # one whose training config was changed behind its back is refused
    (run / "train" / "train_summary.json").unlink()
    (run / "train" / "config.yaml").write_text(saved.replace("seed: 0", "seed: 7"))
    assert main(argv) == 2
    assert "cannot resume" in capsys.readouterr().err
    (run / "train" / "config.yaml").write_text(saved)
    changed = argv[:-1] + ["-q", "--set", "train.lr=0.5"]
    assert main(changed) == 2
    assert "other shared settings" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_fill_one_folder(tiny_bench, tmp_path):
    out = tmp_path / "bench"
    base = [
        sys.executable,
        "-m",
        "maediff",
        "benchmark",
        "--data",
        str(tiny_bench),
        "-o",
        str(out),
        *ARGS,
    ]
    listing = subprocess.run(
        base + ["--list", "--no-estimate"], capture_output=True, text=True, check=True
    ).stdout
    commands = [line for line in listing.splitlines() if line.startswith("maediff benchmark")]
    assert sum("--run-index" in c for c in commands) == 2 and "# 2 job(s)" in listing
    procs = [subprocess.Popen(base + ["--run-index", str(i)]) for i in (0, 1)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    done = sorted(p.parents[2].name for p in out.glob("runs/*/*/eval/summary.json"))
    assert done == ["pddpm-s48", "thresh"]
    assert subprocess.run(base + ["--collect"], capture_output=True, text=True).returncode == 0
    assert "pDDPM s48" in (out / "table.md").read_text()


@pytest.mark.slow
def test_benchmark_probes_diffusion_models_and_states_budgets(tiny_bench, tmp_path):
    out = tmp_path / "bench"
    argv = ["benchmark", "--data", str(tiny_bench), "-o", str(out), "--seeds", "0", "1"]
    argv += ["--models", "fanogan", "ablation-unet", "ablation-unet-mae", *ARGS[3:]]
    assert main(argv) == 0
    probe = (out / "probe.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in probe.splitlines()[2:]}
    assert set(rows) == {"U-Net", "U-Net + MAE"}  # f-AnoGAN is no diffusion model
    assert "(n=2)" in rows["U-Net + MAE"]  # paired with the U-Net run of each seed
    assert rows["U-Net + MAE"].count("-") < rows["U-Net"].count("-")  # MAE columns filled
    page = (out / "report.html").read_text()
    assert "Patch probe" in page and "2 generator + 2 encoder updates" in page
    paired = (out / "paired.md").read_text()  # per-draw values: paired over the probe's slices
    assert "| U-Net + MAE | in-patch l1 |" in paired and "probe slices" in paired
    # Figure 3 shows the first seed: the second one does not reconstruct its slices
    assert (out / "runs/ablation-unet/fold0-seed0/figure3.npz").exists()
    assert not (out / "runs/ablation-unet/fold0-seed1/figure3.npz").exists()


def _summary(d_brats, l1):
    m = {"mean": d_brats}
    return {
        "model": "M",
        "datasets": {
            "Brats21": {"metrics": {"dice": m, "auprc": m}},
            "IXI": {"metrics": {"l1": {"mean": l1}}},
        },
    }


def test_table_marks_best_and_second_in_the_right_direction():
    t = comparison_table(
        {
            "A": [_summary(0.5, 0.02)],
            "B": [_summary(0.3, 0.01), _summary(0.5, 0.01)],
            "C": [_summary(0.1, 0.03)],
        }
    )
    md = t.markdown()
    assert "| A | 1 | **50.00** | **50.00** | - | - | <u>20.00</u> |" in md
    assert (
        "| B | 2 | <u>40.00 ± 14.14</u> | <u>40.00 ± 14.14</u> | - | - | **10.00 ± 0.00** |" in md
    )
    assert "| C | 1 | 10.00 | 10.00 | - | - | 30.00 |" in md
    assert t.runs == [1, 2, 1]


def test_paired_rows_pair_by_subject():
    ref = {"Brats21/dice": {f"s{i}": 0.5 for i in range(8)}}
    better = {"Brats21/dice": {f"s{i}": 0.6 + 0.01 * i for i in reversed(range(8))}}
    rows = paired_rows({"MAEDiff": ref, "X": better, "Y": ref}, "MAEDiff")
    x = next(r for r in rows if r.model == "X")
    assert x.diff.n == 8 and x.diff.mean == pytest.approx(0.135) and x.diff.p_wilcoxon < 0.01
    assert x.verdict() == "resolved: higher"
    y = next(r for r in rows if r.model == "Y")
    assert y.diff.p_wilcoxon != y.diff.p_wilcoxon  # identical values: no test (NaN)
    assert y.verdict() == "not resolved"


def test_report_table_renders_the_marks_as_html():
    from maediff.reporting.report import _markdown_table_to_html

    t = comparison_table({"A": [_summary(0.5, 0.02)], "B": [_summary(0.3, 0.01)]})
    page = _markdown_table_to_html(t.markdown())
    assert (
        "<b>50.00</b>" in page
        and "<u>30.00</u>" in page
        and "**" not in page
        and "&lt;u&gt;" not in page
    )


@pytest.mark.slow
def test_bench_guided_runs_on_a_trained_model(tiny_bench, tmp_path):
    """benchmarks/bench_guided.py (docs/results.md): Alg. 2 and guided selection on the
    same model, through the whole protocol."""
    import importlib.util
    from dataclasses import replace
    from pathlib import Path

    from maediff.config import get_preset
    from maediff.training.data import prepare_training_data
    from maediff.training.trainer import train

    cfg = get_preset("maediff-tiny")
    cfg = replace(cfg, train=replace(cfg.train, max_steps=2))
    train(
        cfg,
        prepare_training_data(cfg, tiny_bench, progress=False),
        tmp_path / "run",
        device="cpu",
        progress=False,
    )
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_guided.py"
    spec = importlib.util.spec_from_file_location("bench_guided", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    full = mod.run(str(tmp_path / "run"), str(tiny_bench), 1, [], 0)
    over = ["inference.patch_selection=guided", "inference.guided_quantile=0.9"]
    guided = mod.run(str(tmp_path / "run"), str(tiny_bench), 1, over, 0)
    assert full["pairs_denoised"] == 1.0 and 0 < guided["pairs_denoised"] < 1
    # val and test of both lesion sets, IXI test, and IXI val (its FPR thresholds)
    assert guided["volumes"] == full["volumes"] == 6
    for key in ("Brats21_dice", "MSLUB_auprc", "IXI_l1", "seconds_per_volume"):
        assert guided[key] >= 0 and full[key] >= 0


# ------------------------------------------------------------------ paired differences


def _finished_run(out, model, seed, subjects, probe=None, fold=0):
    """A finished run folder as execute_run leaves it, enough for `collect`: its
    summary, per-subject CSVs (subjects: data set -> [(dice, auprc)] per subject) and
    optionally probe.json."""
    import csv

    folder = out / "runs" / model / f"fold{fold}-seed{seed}"
    (folder / "eval").mkdir(parents=True)
    means = {ds: sum(d for d, _ in v) / len(v) for ds, v in subjects.items()}
    summary = {
        "model": model,
        "datasets": {
            ds: {"metrics": {"dice": {"mean": m}, "auprc": {"mean": m}}} for ds, m in means.items()
        },
    }
    (folder / "eval" / "summary.json").write_text(json.dumps(summary))
    files = ["eval/summary.json"]
    for ds, values in subjects.items():
        with open(folder / "eval" / f"{ds}_test_subjects.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["subject", "dice", "auprc"])
            w.writerows([f"s{i}", d, a] for i, (d, a) in enumerate(values))
    if probe is not None:
        (folder / "probe.json").write_text(json.dumps(probe))
        files.append("probe.json")
    (folder / "status.json").write_text(json.dumps({"state": "done", "files": files}))


def _paired_csv(out):
    import csv

    return {(r["model"], r["dataset"], r["metric"]): r for r in csv.DictReader(open(out))}


def test_collect_states_each_difference_with_its_interval(tmp_path):
    """Table 1 against MAEDiff: per-subject values averaged over a model's seeds, the
    mean difference in points inside its interval, and the words."""
    import numpy as np

    from maediff.benchmark import BenchmarkPlan, collect

    rng = np.random.default_rng(0)
    out = tmp_path / "bench"
    ref_dice, ref_auprc = rng.uniform(0.3, 0.7, 12), rng.uniform(0.3, 0.7, 12)
    ms = rng.uniform(0.0, 0.1, 3)
    ref = {"Brats21": list(zip(ref_dice, ref_auprc)), "MSLUB": [(v, v) for v in ms]}
    _finished_run(out, "maediff", 0, ref)
    ae_dice = [ref_dice + 0.05 + rng.normal(0, 0.01, 12) for _ in range(2)]  # two seeds
    ae_auprc = ref_auprc - 0.04 + rng.normal(0, 0.01, 12)
    ae_ms = ms + rng.normal(0, 0.05, 3)  # 3 subjects, noisy: not resolved
    for seed in (0, 1):
        brats = list(zip(ae_dice[seed], ae_auprc))
        _finished_run(out, "ae", seed, {"Brats21": brats, "MSLUB": [(v, v) for v in ae_ms]})
    plan = BenchmarkPlan.from_args(models=["ae", "maediff"], scale="tiny", seeds=[0, 1])
    assert collect(plan, out) == 0
    rows = _paired_csv(out / "paired.csv")
    dice = rows[("AE", "Brats21", "dice")]
    expected = 100 * np.mean((ae_dice[0] + ae_dice[1]) / 2 - ref_dice)
    assert float(dice["mean_diff"]) == pytest.approx(expected, rel=1e-12)  # full precision
    for r in rows.values():
        assert float(r["ci_low"]) <= float(r["mean_diff"]) <= float(r["ci_high"])
        assert r["reference"] == "MAEDiff" and r["pairs"] == "subjects"
    assert int(dice["n"]) == 12 and float(dice["ci_low"]) > 0
    assert dice["verdict"] == "resolved: higher"
    assert rows[("AE", "Brats21", "auprc")]["verdict"] == "resolved: lower"
    assert rows[("AE", "MSLUB", "dice")]["verdict"] == "not resolved"
    md = (out / "paired.md").read_text()
    assert "| AE | BraTS21 Dice | 12 subjects | +" in md and "| resolved: higher |" in md
    assert "AE higher on BraTS21 Dice" in md and "not resolved: AE (MSLUB Dice, MSLUB AUPRC)" in md
    page = (out / "report.html").read_text()
    assert "Paired differences against MAEDiff" in page and "Not resolved means" in page


def test_collecting_another_selection_keeps_the_tables_already_there(tmp_path, capsys):
    """Table 2 collected in Table 1's folder (to share its twin runs) writes its own
    folder; collecting Table 1 again updates Table 1's tables in place."""
    from maediff.benchmark import BenchmarkPlan, collect

    out = tmp_path / "bench"
    subjects = {"Brats21": [(0.5, 0.5), (0.4, 0.3), (0.6, 0.6)]}
    _finished_run(out, "maediff", 0, subjects)
    _finished_run(out, "ablation-unet-att", 0, subjects)
    table1 = BenchmarkPlan.from_args(table="1", scale="tiny")
    assert collect(table1, out) == 0
    first = (out / "table.md").read_text()
    assert "| MAEDiff | 1 |" in first and "U-Net + Att." not in first
    assert collect(BenchmarkPlan.from_args(table="2", scale="tiny"), out) == 0
    assert (out / "table.md").read_text() == first  # Table 1's, untouched
    assert "go to" in capsys.readouterr().out
    table2 = (out / "table2" / "table.md").read_text()
    assert "| U-Net + Att. | 1 |" in table2 and (out / "table2" / "report.html").exists()
    _finished_run(out, "ae", 0, subjects)  # Table 1 again, with one more finished row
    assert collect(table1, out) == 0
    assert "| AE | 1 |" in (out / "table.md").read_text()
    assert collect(BenchmarkPlan.from_args(models=["ae"], scale="tiny"), out) == 0
    assert (out / "models-ae" / "table.md").exists()
    (out / "tables.json").unlink()  # a folder from before the index: its table's rows say
    assert collect(table1, out) == 0 and not (out / "table1").exists()
    assert collect(BenchmarkPlan.from_args(table="2", scale="tiny"), out) == 0
    assert "| AE | 1 |" in (out / "table.md").read_text()


def _probe(per_slice, draws=2, bands=2):
    """probe.json of a run whose slice i has l1 per_slice[i] at every draw."""
    per_draw = [float(v) for _ in range(bands * draws) for v in per_slice]
    return {
        "probe": {
            "l1": sum(per_draw) / len(per_draw),
            "bands": [{"t": [1, 5], "l1": 0.0}, {"t": [6, 10], "l1": 0.0}][:bands],
            "n_draws": len(per_draw),
            "n_slices": len(per_slice),
            "seed": 1,
            "per_draw": per_draw,
        }
    }


def test_table2_pairs_with_the_unet_and_the_probe_over_its_slices(tmp_path):
    import numpy as np

    from maediff.benchmark import BenchmarkPlan, collect

    rng = np.random.default_rng(1)
    out = tmp_path / "bench"
    subjects = {"Brats21": [(v, v) for v in rng.uniform(0.3, 0.7, 6)]}
    unet = rng.uniform(0.1, 0.2, 16)
    _finished_run(out, "ablation-unet", 0, subjects, _probe(unet))
    mae_seeds = [unet - 0.01 + rng.normal(0, 0.001, 16) for _ in range(2)]
    for seed, per_slice in enumerate(mae_seeds):
        _finished_run(out, "ablation-unet-mae", seed, subjects, _probe(per_slice))
    att = unet + rng.normal(0, 0.02, 16)  # no systematic difference
    _finished_run(out, "ablation-unet-att", 0, subjects, _probe(att))
    plan = BenchmarkPlan.from_args(table="2", scale="tiny", seeds=[0, 1])
    assert collect(plan, out) == 0
    rows = _paired_csv(out / "paired.csv")
    assert rows[("U-Net + MAE", "Brats21", "dice")]["reference"] == "U-Net"
    probe = rows[("U-Net + MAE", "probe", "l1")]
    assert probe["pairs"] == "probe slices" and int(probe["n"]) == 16
    expected = 100 * np.mean((mae_seeds[0] + mae_seeds[1]) / 2 - unet)
    assert float(probe["mean_diff"]) == pytest.approx(expected, rel=1e-9)
    assert probe["verdict"] == "resolved: lower"
    assert rows[("U-Net + Att.", "probe", "l1")]["verdict"] == "not resolved"
    md = (out / "paired.md").read_text()
    assert "## Patch probe against U-Net" in md and "probe slices" in md


def test_probe_without_per_draw_values_is_paired_over_runs(tmp_path):
    from maediff.benchmark import BenchmarkPlan, collect

    out = tmp_path / "bench"
    subjects = {"Brats21": [(0.5, 0.5), (0.4, 0.4)]}
    for seed, (u, m) in enumerate([(0.20, 0.15), (0.22, 0.18), (0.21, 0.17)]):
        for model, l1 in (("ablation-unet", u), ("ablation-unet-mae", m)):
            probe = {"probe": {"l1": l1, "bands": [{"t": [1, 10], "l1": l1}]}}
            _finished_run(out, model, seed, subjects, probe)
    plan = BenchmarkPlan.from_args(
        models=["ablation-unet", "ablation-unet-mae"], scale="tiny", seeds=[0, 1, 2]
    )
    assert collect(plan, out) == 0
    probe = _paired_csv(out / "paired.csv")[("U-Net + MAE", "probe", "l1")]
    assert probe["pairs"] == "runs" and int(probe["n"]) == 3
    assert float(probe["mean_diff"]) == pytest.approx(-100 * (0.05 + 0.04 + 0.04) / 3)
    assert "keep only each run's mean" in (out / "paired.md").read_text()


def test_a_twin_rows_finished_run_serves_it_only_with_the_same_configuration(tmp_path, capsys):
    """Table 2's U-Net is Table 1's pDDPM s16: run once, it serves both tables (neither
    trained nor evaluated twice), but not when it was run with another configuration."""
    from maediff.benchmark import BenchmarkPlan, RunSpec
    from maediff.benchmark.collect import finished_runs
    from maediff.benchmark.orchestration import _run_all
    from maediff.benchmark.status import twin_run
    from maediff.config import save_config

    out = tmp_path / "bench"
    subjects = {"Brats21": [(0.5, 0.5), (0.4, 0.4)]}
    table1 = BenchmarkPlan.from_args(models=["pddpm-s16"], scale="tiny", seeds=[0])
    _finished_run(out, "pddpm-s16", 0, subjects)
    pddpm = RunSpec("pddpm-s16", 0, 0)
    save_config(table1.config(pddpm), out / "runs" / pddpm.key / "config.yaml")

    table2 = BenchmarkPlan.from_args(models=["ablation-unet"], scale="tiny", seeds=[0])
    unet = RunSpec("ablation-unet", 0, 0)
    assert twin_run(table2, unet, out) == pddpm
    assert [s for s, _ in finished_runs(table2, out)["ablation-unet"]] == [pddpm]
    _run_all(table2, [unet], out, tmp_path / "no-data", "cpu", progress=False)
    assert "done as pddpm-s16/fold0-seed0" in capsys.readouterr().out
    assert not (out / "runs" / unet.key).exists()  # nothing trained or written for it
    from maediff.benchmark.estimate import estimate_jobs

    (out / "runs" / pddpm.key / "timing.json").write_text('{"train_s": 5.0, "evaluate_s": 7.0}')
    (job,) = estimate_jobs(table2, out, measure=False, say=lambda *a: None)
    assert (job.source, job.served_by, job.train_s) == ("done", pddpm.key, 5.0)

    for other in (
        BenchmarkPlan.from_args(models=["ablation-unet"], scale="tiny", seeds=[0], steps=7),
        BenchmarkPlan.from_args(models=["ablation-unet"], scale="tiny", seeds=[1]),
    ):
        assert twin_run(other, RunSpec("ablation-unet", 0, other.seeds[0]), out) is None
    assert twin_run(table2, RunSpec("ablation-unet-att", 0, 0), out) is None  # no twin row
