"""BIDS data sets in (pybids) and out (a derivatives data set), on a small BIDS tree
built from the synthetic benchmark's scans."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from maediff.cli import main
from maediff.data.bids import read_bids, split_every
from maediff.data.io import DataError


def _desc(path, **extra):
    path.mkdir(parents=True, exist_ok=True)
    (path / "dataset_description.json").write_text(
        json.dumps({"Name": "Tiny Hospital", "BIDSVersion": "1.9.0", **extra})
    )


@pytest.fixture(scope="module")
def bids_root(tiny_bench, tmp_path_factory):
    """sub-01..04 controls (IXI scans), sub-05..07 patients (tumour scans with labels),
    one session each; brain masks and lesion labels in derivatives/masks."""
    root = tmp_path_factory.mktemp("bids") / "ds"
    _desc(root)
    deriv = root / "derivatives" / "masks"
    _desc(deriv, DatasetType="derivative", GeneratedBy=[{"Name": "manual"}])
    ixi = sorted((tiny_bench / "Train" / "ixi" / "t2").glob("*.nii.gz"))[:4]
    brats = sorted((tiny_bench / "Test" / "Brats21" / "t2").glob("*.nii.gz"))[:3]
    rows = ["participant_id\tgroup\tage"]
    for i, f in enumerate([*ixi, *brats], 1):
        sub, patient = f"sub-{i:02d}", f in brats
        rows.append(f"{sub}\t{'patient' if patient else 'control'}\t{40 + i}")
        anat = root / sub / "ses-1" / "anat"
        anat.mkdir(parents=True)
        shutil.copy(f, anat / f"{sub}_ses-1_T2w.nii.gz")
        d = deriv / sub / "ses-1" / "anat"
        d.mkdir(parents=True)
        folder = f.parents[1]
        stem = f.name.removesuffix("_t2.nii.gz")
        shutil.copy(
            folder / "mask" / f"{stem}_mask.nii.gz", d / f"{sub}_ses-1_desc-brain_mask.nii.gz"
        )
        if patient:
            shutil.copy(
                folder / "seg" / f"{stem}_seg.nii.gz", d / f"{sub}_ses-1_label-lesion_mask.nii.gz"
            )
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    return root


def test_read_bids_joins_masks_labels_and_participants(bids_root):
    every = read_bids(bids_root)
    assert [s.name for s in every] == [f"sub-{i:02d}_ses-1_T2w" for i in range(1, 8)]
    assert all(
        s.mask is not None and s.mask.name.endswith("_desc-brain_mask.nii.gz") for s in every
    )
    assert [s.seg is not None for s in every] == [False] * 4 + [True] * 3
    assert every[4].seg.name == "sub-05_ses-1_label-lesion_mask.nii.gz"
    assert every[0].folder == "sub-01/ses-1/anat"
    controls = read_bids(bids_root, {"group": "control"})
    assert [s.name[:6] for s in controls] == ["sub-01", "sub-02", "sub-03", "sub-04"]
    assert len(read_bids(bids_root, lesions=True)) == 3
    assert [s.name[:6] for s in read_bids(bids_root, {"group": "control", "age": "42"})] == [
        "sub-02"
    ]
    with pytest.raises(DataError, match="no column"):
        read_bids(bids_root, {"diagnosis": "x"})
    with pytest.raises(DataError, match="matches"):
        read_bids(bids_root, {"group": "nobody"})
    rest, held = split_every(every, 0.25)
    assert [s.name[:6] for s in held] == ["sub-01", "sub-05"] and len(rest) == 5


def test_derivatives_without_a_description_are_refused(bids_root, tmp_path):
    bad = tmp_path / "ds"
    shutil.copytree(bids_root, bad)
    (bad / "derivatives" / "masks" / "dataset_description.json").unlink()
    with pytest.raises(DataError, match="no dataset_description.json"):
        read_bids(bad)


@pytest.mark.slow
def test_train_evaluate_and_detect_on_bids(bids_root, tmp_path):
    run = tmp_path / "run"
    common = ["--device", "cpu", "-q"]
    assert (
        main(
            [
                "train",
                "--train-list",
                str(bids_root),
                "--participants",
                "group=control",
                "--run",
                str(run),
                "--preset",
                "maediff-tiny",
                "--set",
                "train.max_steps=2",
                *common,
            ]
        )
        == 0
    )
    sources = json.loads((run / "run.json").read_text())
    assert sources["participants"] == {"group": "control"}

    ev = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--baseline",
                "thresh",
                "--preset",
                "tiny",
                "--data",
                str(bids_root),
                "-o",
                str(ev),
                *common,
            ]
        )
        == 0
    )
    s = json.loads((ev / "summary.json").read_text())
    d = s["datasets"]["TinyHospital"]
    assert d["n_test"] == 2 and d["threshold_source"].startswith("TinyHospital val (1 volumes")
    assert s["datasets"]["IXI"]["n_test"] == 4  # the scans without lesion labels
    assert d["lesions"]["lesions"] >= 2

    out = bids_root / "derivatives" / "maediff"
    try:
        assert (
            main(
                [
                    "detect",
                    "-i",
                    str(bids_root),
                    "--participants",
                    "group=patient",
                    "-o",
                    str(out),
                    "--model",
                    str(run),
                    "--threshold",
                    "0.1",
                    *common,
                ]
            )
            == 0
        )
        desc = json.loads((out / "dataset_description.json").read_text())
        assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "maediff"
        anat = out / "sub-05" / "ses-1" / "anat"
        names = sorted(p.name for p in anat.iterdir())
        assert "sub-05_ses-1_desc-anomalymap_T2w.nii.gz" in names
        assert "sub-05_ses-1_desc-anomalymask_T2w.nii.gz" in names
        side = json.loads((anat / "sub-05_ses-1_desc-anomalymap_T2w.json").read_text())
        assert side["Sources"] == ["bids:raw:sub-05/ses-1/anat/sub-05_ses-1_T2w.nii.gz"]
        src = nib.load(bids_root / "sub-05" / "ses-1" / "anat" / "sub-05_ses-1_T2w.nii.gz")
        amap = nib.load(anat / "sub-05_ses-1_desc-anomalymap_T2w.nii.gz")
        assert amap.shape == src.shape and np.allclose(amap.affine, src.affine)
        assert not (out / "sub-01").exists()  # controls were not selected
        # the data set with its new derivatives still reads, and its scans are unchanged
        assert len(read_bids(bids_root)) == 7

        from bids import BIDSLayout

        layout = BIDSLayout(out, validate=False, is_derivative=True)
        assert len(layout.get(desc="anomalymap", extension=".nii.gz")) == 3
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_a_bare_bids_data_set_reads_and_detects(bids_root, tmp_path, monkeypatch, capsys):
    """The common case: raw scans, dataset_description.json and participants.tsv, no
    derivatives folder (no brain masks yet). Every scan is read without a mask (the
    brain is image > 0, the rule for NIfTI input), and `maediff detect -i DS` with a
    relative path writes the derivatives data set."""
    from maediff.config import get_preset, save_config
    from maediff.models import build_model
    from maediff.weights import save_weights

    bare = tmp_path / "bare"
    shutil.copytree(bids_root, bare, ignore=shutil.ignore_patterns("derivatives"))
    subjects = read_bids(bare)
    assert len(subjects) == 7 and all(s.mask is None and s.seg is None for s in subjects)
    assert [s.name for s in read_bids(bare, {"group": "patient"})] == [
        f"sub-0{i}_ses-1_T2w" for i in (5, 6, 7)
    ]
    run = tmp_path / "run"
    run.mkdir()
    model = build_model(get_preset("dae-tiny"))
    save_config(model.cfg, run / "config.yaml")
    save_weights(model, run / "best.safetensors")
    monkeypatch.chdir(tmp_path)
    argv = ["detect", "-i", "bare", "-o", "bare/derivatives/maediff", "--model", "run"]
    assert main([*argv, "--participants", "group=patient", "--device", "cpu", "-q"]) == 0
    out = bare / "derivatives" / "maediff" / "sub-06" / "ses-1" / "anat"
    assert (out / "sub-06_ses-1_desc-anomalymap_T2w.nii.gz").exists()
    assert "3 written" in capsys.readouterr().out
