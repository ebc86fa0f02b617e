"""The label-free workflow of docs/labelfree.md: its commands and Python, run on a small
BIDS data set built here (controls to train on, controls to calibrate on, patients)."""

import csv
import json
import re
import shlex
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from maediff.cli import main
from maediff.names import shown_name

DOC = Path(__file__).resolve().parents[1] / "docs" / "labelfree.md"
TINY = "--preset maediff-tiny --set train.max_steps=2"


def _desc(path, **extra):
    path.mkdir(parents=True, exist_ok=True)
    (path / "dataset_description.json").write_text(
        json.dumps({"Name": "Label free", "BIDSVersion": "1.9.0", **extra})
    )


def build_bids(bench: Path, root: Path) -> Path:
    """sub-01..04 controls to train on, sub-05..07 controls to calibrate on (synthetic
    IXI scans), sub-08..09 patients (tumour scans, no lesion labels given)."""
    _desc(root)
    deriv = root / "derivatives" / "masks"
    _desc(deriv, DatasetType="derivative", GeneratedBy=[{"Name": "manual"}])
    ixi = sorted((bench / "Train" / "ixi" / "t2").glob("*.nii.gz"))[:7]
    brats = sorted((bench / "Test" / "Brats21" / "t2").glob("*.nii.gz"))[:2]
    rows = ["participant_id\tgroup\tset"]
    for i, f in enumerate([*ixi, *brats], 1):
        sub = f"sub-{i:02d}"
        group, use = (
            ("patient", "n/a") if f in brats else ("control", "train" if i <= 4 else "calibration")
        )
        rows.append(f"{sub}\t{group}\t{use}")
        anat = root / sub / "ses-1" / "anat"
        anat.mkdir(parents=True)
        shutil.copy(f, anat / f"{sub}_ses-1_T2w.nii.gz")
        d = deriv / sub / "ses-1" / "anat"
        d.mkdir(parents=True)
        stem = f.name.removesuffix("_t2.nii.gz")
        mask = f.parents[1] / "mask" / f"{stem}_mask.nii.gz"
        shutil.copy(mask, d / f"{sub}_ses-1_desc-brain_mask.nii.gz")
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    return root


def doc_blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", DOC.read_text(), flags=re.S)


def worked_commands() -> list[list[str]]:
    """The maediff commands of the worked example, at the tiny scale."""
    out = []
    for line in doc_blocks("bash")[0].splitlines():
        if line.startswith("maediff "):
            line = line.replace("--preset paper", TINY)
            out.append([*shlex.split(line)[1:], "--device", "cpu", "-q"])
    return out


@pytest.mark.slow  # end to end: trains and runs whole commands
def test_the_worked_example_runs(tiny_bench, tmp_path, monkeypatch, capsys):
    build_bids(tiny_bench, tmp_path / "ds")
    monkeypatch.chdir(tmp_path)
    commands = worked_commands()
    assert [c[0] for c in commands] == ["train", "calibrate", "detect", "export", "detect"]
    for argv in commands:
        if argv[0] == "export":
            argv = argv[:-3]  # export has no --device / -q
        assert main(argv) == 0, argv

    # what the model was trained on is in the model: the BIDS contrast and the scans' measures
    from maediff.training.checkpoint import read_checkpoint

    record = read_checkpoint("model.safetensors")[0].data.trained_on
    assert record.contrast == "T2w" and record.scans >= 1 and record.skull_stripped == "yes"
    assert len(record.landmarks_low) == 11 and "BIDS ds/" in record.source

    cal = json.loads(Path("calib/calibration.json").read_text())
    assert cal["n_scans"] == 3 and cal["scans"] == [f"sub-0{i}_ses-1_T2w" for i in (5, 6, 7)]
    assert [t["fpr"] for t in cal["thresholds"]] == [0.01, 0.05]
    t1, t5 = cal["thresholds"]
    assert t1["threshold"] > t5["threshold"] > 0  # a lower rate needs a higher threshold
    assert t1["ci_low"] <= t1["threshold"] <= t1["ci_high"]
    assert cal["warnings"] and "below 20" in cal["warnings"][0]
    assert len(cal["model"]["weights_sha256"]) == 64

    out = Path("ds/derivatives/maediff")
    with (out / "scores.tsv").open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [r["participant_id"] for r in rows] == ["sub-08", "sub-09"]
    assert all(float(r["threshold"]) == pytest.approx(t1["threshold"], rel=1e-5) for r in rows)
    assert all("1% of brain voxels of 3 healthy scans" in r["threshold_source"] for r in rows)
    assert all(0 <= float(r["control_percentile"]) <= 100 for r in rows)
    assert json.loads((out / "scores.json").read_text())["anomaly_score"]["Description"]
    # the binary map holds what the table says (its voxels on the input grid, so compare loosely)
    anat = out / "sub-08" / "ses-1" / "anat"
    mask = nib.load(anat / "sub-08_ses-1_desc-anomalymask_T2w.nii.gz")
    side = json.loads((anat / "sub-08_ses-1_desc-anomalymask_T2w.json").read_text())
    assert (
        side["Threshold"] == pytest.approx(t1["threshold"])
        and "healthy scans" in side["ThresholdSource"]
    )
    voxel_ml = abs(np.linalg.det(mask.affine[:3, :3])) / 1000
    assert (float(rows[0]["anomalous_ml"]) > 0) == (np.asarray(mask.dataobj).sum() * voxel_ml > 0)

    # the exported file carries the calibration: the same threshold and scores without --threshold-from
    with (Path("maps-from-file") / "scores.tsv").open(newline="") as f:
        again = list(csv.DictReader(f, delimiter="\t"))
    assert [r["anomaly_score"] for r in again] == [r["anomaly_score"] for r in rows]
    assert [r["threshold"] for r in again] == [r["threshold"] for r in rows]

    # a model is its content: the exported file (or a copy of it) into the folder the run
    # filled finds its scans done
    shutil.copy("model.safetensors", "copy.safetensors")
    capsys.readouterr()
    again_argv = ["detect", "--model", "copy.safetensors", "-i", "ds/", "--participants"]
    again_argv += ["group=patient", "-o", str(out), "--fpr", "0.01", "--device", "cpu", "-q"]
    assert main(again_argv) == 0
    assert "0 written, 2 skipped" in capsys.readouterr().out

    # the documented Python reads the table
    capsys.readouterr()
    exec(doc_blocks("python")[0], {})
    printed = capsys.readouterr().out.split("\n")
    assert {ln.split()[0] for ln in printed if ln} == {"sub-08", "sub-09"}


def test_evaluate_reports_label_free_results_beside_the_protocol(tiny_bench, tmp_path, capsys):
    """Scan-level AUROC and Dice at thresholds set at FPRs on IXI val; the protocol's
    threshold and Dice stay what they were."""
    from maediff.config import get_preset
    from maediff.data.datasets import load_subject
    from maediff.data.splits import read_pddpm_split
    from maediff.evaluation.protocol import EvalSettings, VolumeResult, score_volume
    from maediff.models import build_model
    from maediff.pipeline.evaluate import evaluate_model, plan_evaluation
    from maediff.reporting.summary import EvaluationSummary

    model = build_model(get_preset("thresh-tiny"))
    s = evaluate_model(
        model, tiny_bench, tmp_path / "ev", label="Thresh", progress=False, figures=False,
        workers=0, max_volumes=1,
    )  # fmt: skip
    plain = plan_evaluation(tiny_bench, max_volumes=1)
    assert plain.healthy_val and plain.subjects()[: len(plain.healthy_val)] == plain.healthy_val
    # the thresholds: pooled brain-voxel quantiles of the healthy validation volumes
    cfg = model.cfg.data
    pool = []
    for sub in read_pddpm_split(tiny_bench, "IXI", "val", 0)[:1]:
        v = load_subject(sub, cfg)
        vr = VolumeResult(sub.name, v.image, np.zeros_like(v.image), v.brain_mask)
        pool.append(score_volume(vr, EvalSettings())[v.brain_mask])
    pooled = np.concatenate(pool)
    for ds, d in s.anomaly.items():
        f = d.label_free
        assert f is not None and f.thresholds_source.startswith("IXI val fold 0")
        assert [a.fpr for a in f.at_fpr] == [0.01, 0.05, 0.10]
        for a in f.at_fpr:
            assert a.threshold == pytest.approx(np.quantile(pooled, 1 - a.fpr), rel=1e-5)
        assert 0 <= f.scan_auroc <= 1 and f.n_healthy == 1 and f.n_unhealthy == d.n_test
        rows = list(csv.DictReader(open(tmp_path / "ev" / f"{ds}_test_subjects.csv")))
        dice5 = [float(r["dice_fpr5"]) for r in rows if r["dice_fpr5"] not in ("", "nan")]
        assert f.at_fpr[1].dice.mean == pytest.approx(np.mean(dice5), rel=1e-5)
        assert d.threshold_source.startswith(f"{shown_name(ds)} val")  # the protocol's threshold
    # the file reads back and dumps unchanged; the report has the table
    saved = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert EvaluationSummary.from_json(saved).to_json() == saved
    assert "scan AUROC" in (tmp_path / "ev" / "labelfree.md").read_text()
    healthy = list(csv.DictReader(open(tmp_path / "ev" / "IXI_test_subjects.csv")))
    assert all(float(r["anomaly_score"]) > 0 for r in healthy)
    # detect takes an evaluation's FPR threshold too
    from maediff.weights import save_weights

    save_weights(model, tmp_path / "thresh.safetensors")
    scan = sorted((tiny_bench / "Test" / "Brats21" / "t2").glob("*.nii.gz"))[0]
    argv = ["detect", "-i", str(scan), "-o", str(tmp_path / "maps"), "--device", "cpu", "-q"]
    argv += [
        "--model",
        str(tmp_path / "thresh.safetensors"),
        "--threshold-from",
        str(tmp_path / "ev"),
    ]
    assert main([*argv, "--fpr", "0.05"]) == 0
    row = next(csv.DictReader(open(tmp_path / "maps" / "scores.csv")))
    assert float(row["threshold"]) == pytest.approx(
        s.anomaly["Brats21"].label_free.at_fpr[1].threshold, rel=1e-5
    )
    assert "5% FPR on IXI val fold 0 (1 healthy volumes)" in row["threshold_source"]
    assert main([*argv, "--fpr", "0.02"]) == 2  # the evaluation has no such rate
    capsys.readouterr()
    assert main([*argv, "--fpr", "0.05"]) == 0  # done with this threshold: skipped
    assert "0 written, 1 skipped" in capsys.readouterr().out
    # another threshold would rewrite the maps: refused without --overwrite, then done again
    assert main([*argv[:-2], "--threshold", "0.5"]) == 2
    assert "made with other settings" in capsys.readouterr().err
    assert main([*argv[:-2], "--threshold", "0.5", "--overwrite"]) == 0
    assert "1 written, 0 skipped" in capsys.readouterr().out
    row = next(csv.DictReader(open(tmp_path / "maps" / "scores.csv")))
    assert row["threshold"] == "0.5" and "command line" in row["threshold_source"]
