"""What the model was trained on, and the checks of each scan against it (data/qc.py):
a scan like the training scans raises no flag; another contrast, skull or background
left in, a cut field of view or coarse voxels do; detect writes the flags, warns,
and refuses with --strict; a model is known by its content, not its path."""

import csv
import shutil
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch

from maediff.cli import main
from maediff.config import TrainingRecord, get_preset
from maediff.data.load import prepare_volume
from maediff.data.qc import NO_RECORD, ScanWarning, check_scan, measure_scan, training_record
from maediff.models import build_model
from maediff.training.checkpoint import read_checkpoint, save_weights

DATA = get_preset("maediff-tiny").data  # the grid of the model of the detect tests
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
SHAPE = (80, 96, 72)


def brain_scan(seed: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A T2-like brain on a zero background: bright CSF shell and ventricles, darker
    grey then white matter; (image, brain mask) on a 2 mm grid."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    r = np.sqrt((x / 0.7) ** 2 + (y / 0.8) ** 2 + (z / 0.75) ** 2) / scale
    brain = r < 1
    img = np.where(r < 0.55, 0.35, 0.55) + np.where(r > 0.88, 0.45, 0.0)
    img = img + 0.5 * (np.sqrt((x / 0.12) ** 2 + (y / 0.3) ** 2 + (z / 0.2) ** 2) < 1)
    img = img * (1 + 0.04 * rng.standard_normal(SHAPE))
    return (img * brain).astype(np.float32), brain


def measured(img, brain, affine=AFFINE, with_mask=True):
    image = nib.Nifti1Image(img, affine)
    mask = nib.Nifti1Image(brain.astype(np.uint8), affine) if with_mask else None
    vol = prepare_volume(image, mask, None, DATA)
    return measure_scan(image, mask, vol)


@pytest.fixture(scope="module")
def record() -> TrainingRecord:
    scans = [brain_scan(s, scale) for s, scale in ((1, 0.95), (2, 1.0), (3, 1.05))]
    return training_record([measured(*s) for s in scans], contrast="T2w")


def flags_of(m, record):
    return [name for name, _ in check_scan(m, record)]


def test_the_record_holds_the_training_ranges(record):
    assert record.scans == 3 and record.contrast == "T2w" and record.skull_stripped == "yes"
    assert record.voxel_mm == (2.0, 2.0)
    lo, hi = record.brain_ml
    assert 0 < lo < hi  # three sizes of brain
    assert all(a <= b for a, b in zip(record.landmarks_low, record.landmarks_high))


def test_a_scan_like_the_training_scans_raises_no_flag(record):
    assert flags_of(measured(*brain_scan(7)), record) == []
    assert flags_of(measured(*brain_scan(8, 1.02), with_mask=False), record) == []


def test_another_contrast_is_flagged(record):
    img, brain = brain_scan(7)
    t1 = np.where(brain, img[brain].max() + img[brain].min() - img, 0).astype(np.float32)
    found = check_scan(measured(t1, brain), record)
    assert [n for n, _ in found] == ["contrast"]
    assert "T2w" in found[0][1]  # the reason names the model's contrast


def test_skull_or_background_left_in_is_flagged(record):
    img, brain = brain_scan(7)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    r = np.sqrt((x / 0.7) ** 2 + (y / 0.8) ** 2 + (z / 0.75) ** 2)
    skull = (r > 1.05) & (r < 1.2)
    with_skull = img + 0.8 * skull
    # with the brain mask given: signal outside it
    assert "skull_or_background" in flags_of(measured(with_skull, brain), record)
    # without a mask (image > 0): the "brain" holds the skull, or all the noisy background
    assert "brain_volume" in flags_of(measured(with_skull, brain, with_mask=False), record)
    noisy = with_skull + 0.02 + 0.01 * np.random.default_rng(0).random(SHAPE)
    assert "skull_or_background" in flags_of(measured(noisy, brain, with_mask=False), record)


def test_a_cut_field_of_view_and_coarse_voxels_are_flagged(record):
    img, brain = brain_scan(7)
    mid = SHAPE[2] // 2
    cut = flags_of(measured(img[:, :, mid - 8 : mid + 8], brain[:, :, mid - 8 : mid + 8]), record)
    assert "field_of_view" in cut and "brain_extent" in cut
    coarse = np.diag([2.0, 2.0, 12.0, 1.0])  # every 6th slice of the same brain
    thick = flags_of(measured(img[:, :, ::6], brain[:, :, ::6], coarse), record)
    assert "resolution" in thick


def test_a_model_without_a_record_checks_nothing():
    assert check_scan(measured(*brain_scan(7)), TrainingRecord()) == []


# ---------------------------------------------------------------- detect


def write_scan(path, img, brain):
    nib.save(nib.Nifti1Image(img, AFFINE), path)
    nib.save(
        nib.Nifti1Image(brain.astype(np.uint8), AFFINE), str(path).replace(".nii", "_mask.nii")
    )


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, record):
    """An untrained maediff-tiny model whose record is that of the scans above."""
    torch.manual_seed(0)
    cfg = get_preset("maediff-tiny")
    cfg = replace(cfg, data=replace(cfg.data, trained_on=record))
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    return save_weights(build_model(cfg), path)


@pytest.fixture
def scans(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    img, brain = brain_scan(7)
    write_scan(folder / "plain.nii.gz", img, brain)
    t1 = np.where(brain, img[brain].max() + img[brain].min() - img, 0).astype(np.float32)
    write_scan(folder / "t1like.nii.gz", t1, brain)
    return folder


def detect(scans, out, model, *extra):
    argv = ["detect", "-i", str(scans), "-o", str(out), "--model", str(model)]
    return main([*argv, "--device", "cpu", "-q", *extra])


def qc_column(out):
    with (out / "scores.csv").open(newline="") as f:
        return {r["scan"]: r["qc"] for r in csv.DictReader(f)}


@pytest.mark.slow
def test_detect_flags_a_scan_unlike_the_training_scans(scans, model_file, tmp_path):
    out = tmp_path / "maps"
    with pytest.warns(ScanWarning) as warned:
        assert detect(scans, out, model_file) == 0
    assert qc_column(out) == {"plain": "", "t1like": "contrast"}
    flagged = [str(w.message) for w in warned]
    assert len(flagged) == 1 and "t1like.nii.gz" in flagged[0] and "contrast" in flagged[0]
    assert (out / "t1like_anomaly.nii.gz").exists()  # flagged, and still mapped
    assert not list(out.glob("*.png")) and not (out / "index.html").exists()  # not asked for


@pytest.mark.slow
def test_detect_qc_draws_a_picture_per_scan_and_a_page(scans, model_file, tmp_path):
    out = tmp_path / "maps"
    (out).mkdir()
    (out / "index.html").write_text("<html>someone else's page</html>")
    assert detect(scans, out, model_file, "--qc") == 2  # not ours: refused before any work
    assert not list(out.glob("*.nii.gz"))
    (out / "index.html").unlink()
    with pytest.warns(ScanWarning):
        assert detect(scans, out, model_file, "--qc") == 0
    pictures = sorted(p.name for p in out.glob("*.png"))
    assert pictures == ["plain_qc.png", "t1like_qc.png"]
    page = (out / "index.html").read_text()
    assert all(p in page for p in pictures) and "contrast" in page
    import matplotlib.image

    png = matplotlib.image.imread(out / "plain_qc.png")
    assert png.shape[0] > 500 and png[..., :3].std() > 0.05  # a drawn figure, not blank


@pytest.mark.slow
def test_detect_strict_refuses_the_flagged_scan_only(scans, model_file, tmp_path, capsys):
    out = tmp_path / "maps"
    assert detect(scans, out, model_file, "--strict") == 1
    err = capsys.readouterr().err
    assert "t1like.nii.gz" in err and "--strict" in err
    assert qc_column(out) == {"plain": ""}
    assert not list(out.glob("t1like*"))


@pytest.mark.slow
def test_a_model_without_a_record_is_said_so(scans, model_file, tmp_path, capsys):
    cfg, tensors, extra = read_checkpoint(model_file)
    old = replace(cfg, data=replace(cfg.data, trained_on=TrainingRecord()))
    m = build_model(old)
    m.load_state_dict(tensors)
    path = save_weights(m, tmp_path / "old.safetensors", extra)
    out = tmp_path / "maps"
    with pytest.warns(ScanWarning) as warned:
        assert detect(scans, out, path) == 0
    assert [str(w.message) for w in warned] == [NO_RECORD]  # once, not per scan
    assert set(qc_column(out).values()) == {"no_training_record"}
    assert detect(scans, tmp_path / "strict", path, "--strict") == 2
    assert "--strict" in capsys.readouterr().err and not (tmp_path / "strict").exists()


@pytest.mark.slow
def test_a_copy_of_the_model_file_is_the_same_model(scans, model_file, tmp_path, capsys):
    out = tmp_path / "maps"
    assert detect(scans, out, model_file) == 0
    copy = tmp_path / "elsewhere" / "mine.safetensors"
    copy.parent.mkdir()
    shutil.copy(model_file, copy)
    capsys.readouterr()
    assert detect(scans, out, copy) == 0
    assert "0 written, 2 skipped" in capsys.readouterr().out
    # other weights into the same folder are refused
    cfg, tensors, extra = read_checkpoint(model_file)
    m = build_model(cfg)
    m.load_state_dict({k: v + 0.01 if v.is_floating_point() else v for k, v in tensors.items()})
    other = save_weights(m, tmp_path / "other.safetensors", extra)
    assert detect(scans, out, other) == 2
    assert "other settings" in capsys.readouterr().err


def test_info_prints_the_record_the_hashes_and_the_card(model_file, capsys):
    assert main(["info", str(model_file)]) == 0
    out = capsys.readouterr().out
    assert "weights sha256: " in out and "config sha256: " in out
    assert "contrast: T2w" in out and "intensity landmarks" in out
    assert "## Model card" in out and "healthy T2w brain MRI" in out
    assert "No calibration" in out or "none: set thresholds" in out


def test_the_shipped_model_records_its_synthetic_training_data():
    from maediff.pretrained import checkpoint_path
    from maediff.training.export import read_card
    from maediff.weights import weights_sha256

    cfg, tensors, _ = read_checkpoint(checkpoint_path())
    # the weights of 0.7.0, unchanged: only the file's metadata gained the record
    assert weights_sha256(tensors) == (
        "5c07742021fe7577078fa5e99b4f8faaac579282878fcf322a3d17743771ac4e"
    )
    r = cfg.data.trained_on
    assert r.scans == 96 and r.synthetic and r.contrast == "T2w" and r.skull_stripped == "yes"
    assert len(r.landmarks_low) == 11 and r.brain_ml[0] < r.brain_ml[1]
    card = read_card(checkpoint_path())
    assert "synthetic" in card and "no scans of people" in card
    assert "healthy T2-weighted brain MRI" not in card
    assert r.source.startswith("data/synthetic: IXI fold 0")  # no path of the machine it ran on


def test_the_report_examples_have_a_colour_bar_and_say_synthetic(tmp_path):
    import matplotlib.image
    import matplotlib.pyplot as plt

    from maediff.reporting import report

    rng = np.random.default_rng(0)
    vol = rng.random((16, 16, 8)).astype(np.float32)
    ex = {"name": "s", "image": vol, "reconstruction": vol, "scores": vol}
    drawn = []
    real = report.colour_bar
    report.colour_bar = lambda fig, shown, ax: drawn.append(ax) or real(fig, shown, ax)
    try:
        path = report.figure_examples([ex], tmp_path / "ex.png", 1, note="synthetic brains")
    finally:
        report.colour_bar = real
    assert len(drawn) == 1 and matplotlib.image.imread(path).shape[0] > 100
    plt.close("all")


def test_an_evaluation_on_the_synthetic_benchmark_says_so(tmp_path):
    from types import SimpleNamespace

    from maediff.reporting.results import data_note

    assert data_note(SimpleNamespace(data_dir=str(tmp_path))) is None
    (tmp_path / "synthetic.json").write_text("{}")  # what maediff synth writes
    assert "synthetic" in data_note(SimpleNamespace(data_dir=str(tmp_path)))
    assert data_note(SimpleNamespace(data_dir=None)) is None


def test_bids_input_takes_the_models_contrast_or_suffix(tmp_path):
    import argparse
    import json

    from maediff.cli import _suffix
    from maediff.data.io import DataError
    from maediff.data.splits import read_inputs

    ds = tmp_path / "ds"
    anat = ds / "sub-01" / "anat"
    anat.mkdir(parents=True)
    (ds / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.9.0"}))
    img, _ = brain_scan(1)
    nib.save(nib.Nifti1Image(img, AFFINE), anat / "sub-01_FLAIR.nii.gz")
    torch.manual_seed(0)
    cfg = get_preset("maediff-tiny")
    flair = replace(
        cfg, data=replace(cfg.data, trained_on=TrainingRecord(scans=1, contrast="FLAIR"))
    )
    model = save_weights(build_model(flair), tmp_path / "flair.safetensors")
    args = argparse.Namespace(suffix=None, model=str(model), input=str(ds))
    assert _suffix(args) == "FLAIR"  # the model's contrast
    assert [s.name for s in read_inputs(ds, suffix=_suffix(args))] == ["sub-01_FLAIR"]
    args.suffix = "T2w"  # --suffix wins
    with pytest.raises(DataError, match="no T2w scans"):
        read_inputs(ds, suffix=_suffix(args))
