"""`maediff benchmark` end to end on the tiny scale: runs, resume, refusal, tables,
Figure 3, and two processes filling one folder."""

import json
import shutil
import subprocess
import sys

import pytest

from maediff.cli import main
from maediff.reporting.comparison import comparison_table, paired_tests

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
    assert not (out / "wilcoxon.md").exists()  # no MAEDiff among the models: nothing to pair with
    table = (out / "table.md").read_text()
    assert "| Thresh | 2 |" in table and "| pDDPM s48 | 2 |" in table
    free = (out / "labelfree.md").read_text()  # scan AUROC, Dice at FPR thresholds per run
    assert "scan AUROC" in free and free.count("| BraTS21 |") == 4
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
    listing = subprocess.run(base + ["--list"], capture_output=True, text=True, check=True).stdout
    assert listing.count("--run-index") == 2
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
        "| B | 2 | <u>40.00 ± 10.00</u> | <u>40.00 ± 10.00</u> | - | - | **10.00 ± 0.00** |" in md
    )
    assert "| C | 1 | 10.00 | 10.00 | - | - | 30.00 |" in md
    assert t.runs == [1, 2, 1]


def test_paired_tests_pair_by_subject():
    ref = {"Brats21/dice": {f"s{i}": 0.5 for i in range(8)}}
    better = {"Brats21/dice": {f"s{i}": 0.6 + 0.01 * i for i in range(8)}}
    rows = paired_tests({"MAEDiff": ref, "X": better, "Y": ref}, "MAEDiff")
    x = next(r for r in rows if r["model"] == "X")
    assert x["n"] == 8 and x["median_diff"] > 0.1 and x["p"] < 0.01
    y = next(r for r in rows if r["model"] == "Y")
    assert y["p"] != y["p"]  # identical values: no test (NaN)


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
