"""The output rule (outputs.py, docs/reliability.md): a command writes only the files it
declares, records them in OUT/.maediff-outputs.jsonl, replaces only files recorded as
its own, refuses any other existing file without --overwrite before any work, and
writes with the user's umask. Also the failures of issue 41 that a row of
tests/test_bad_inputs.py cannot show (a full disk, a read-only folder, a symbolic link,
what scores.csv says)."""

import csv
import json
import os
import shutil
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from safetensors import SafetensorError

from maediff.cli import main
from maediff.config import get_preset
from maediff.models import build_model
from maediff.outputs import (
    RECORD,
    OutputError,
    check_outputs,
    check_own_folder,
    record_outputs,
    recorded,
    safe_name,
)
from maediff.training.checkpoint import save_weights

MM6 = np.diag([6.0, 6.0, 6.0, 1.0])


def _brain(shape=(32, 32, 8)) -> np.ndarray:
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    return np.where(x**2 + y**2 + z**2 < 0.6, 1.0 + 0.2 * x, 0.0).astype(np.float32)


def _scan(path: Path, data=None, affine=MM6) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(_brain() if data is None else data, affine), path)
    return path


@pytest.fixture
def run(tmp_path) -> Path:
    """A run folder of an untrained dae-tiny (its initial weights and config)."""
    from maediff.config import save_config

    folder = tmp_path / "run"
    folder.mkdir()
    model = build_model(get_preset("dae-tiny"))
    save_config(model.cfg, folder / "config.yaml")
    save_weights(model, folder / "best.safetensors")
    return folder


# ------------------------------------------------------------------ the module


def test_the_rule_replaces_recorded_files_and_refuses_others(tmp_path):
    out = tmp_path / "out"
    check_outputs(out, "calibrate", ["a.md", "b.csv"])  # nothing there: fine, nothing made
    assert not out.exists()
    out.mkdir()
    (out / "a.md").write_text("the user's")
    with pytest.raises(OutputError, match=r"a\.md exists \(not written by maediff calibrate\)"):
        check_outputs(out, "calibrate", ["a.md", "b.csv"])
    check_outputs(out, "calibrate", ["a.md"], overwrite=True)  # asked for
    record_outputs(out, "calibrate", ["a.md", "b.csv"])
    check_outputs(out, "calibrate", ["a.md", "b.csv"])  # now its own
    with pytest.raises(OutputError, match=r"a\.md exists \(written by maediff calibrate\)"):
        check_outputs(out, "report", ["a.md"])  # another command's file is not report's
    with pytest.raises(OutputError, match="exists"):
        check_outputs(out, "calibrate", ["a.md"], keep_own=True)  # a finished result
    with pytest.raises(OutputError, match="is an input of this command"):
        check_outputs(out, "calibrate", ["a.md"], overwrite=True, inputs=[out / "a.md"])
    with pytest.raises(OutputError, match="would be written outside"):
        check_outputs(out, "detect", ["../x.csv"])
    (out / "scan_1.png").write_text("x")
    with pytest.raises(OutputError, match=r"scan_1\.png exists"):
        check_outputs(out, "report", ["*.png"])
    # a line cut by a kill is ignored, the others count
    with (out / RECORD).open("a") as f:
        f.write('{"command": "rep')
    assert recorded(out) == {"calibrate": ["a.md", "b.csv"]}


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "a\\b", ".hidden", "", "x\ny", "a" * 201])
def test_names_that_could_leave_the_output_are_refused(name):
    with pytest.raises(OutputError, match="cannot name an output file"):
        safe_name(name, "list.csv line 2")


@pytest.mark.parametrize("name", ["sub-01_ses-1_T2w", "-dash", "with space", "ü", "a.b"])
def test_ordinary_names_pass(name):
    assert safe_name(name, "x") == name


def test_a_folder_command_takes_only_its_own_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(OutputError, match=r"holds files that maediff synth did not write"):
        check_own_folder(tmp_path / "mine", "synth", marks=("synthetic.json",))
    check_own_folder(tmp_path / "new", "synth")  # absent
    (tmp_path / "mine" / "synthetic.json").write_text("{}")
    check_own_folder(tmp_path / "mine", "synth", marks=("synthetic.json",))


# ------------------------------------------------------------------ commands


def test_synth_overwrite_never_removes_a_folder_it_did_not_make(tmp_path, capsys):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    assert main(["synth", "-o", str(home), "--overwrite", "-q"]) == 2
    assert "holds files that maediff synth did not write" in capsys.readouterr().err
    assert (home / "thesis.tex").read_text() == "years of work"


def test_benchmark_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.md").write_text("mine")
    argv = ["benchmark", "--models", "dae", "--scale", "tiny", "-o", str(tmp_path / "b")]
    assert main([*argv, "--list", "--no-estimate"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "holds files that maediff benchmark did not write (notes.md)" in line
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["notes.md"]


def test_report_replaces_its_own_files_and_records_them(tmp_path, capsys):
    ev = tmp_path / "ev"
    ev.mkdir()
    metrics = {"dice": {"mean": 0.5, "std": 0.0, "n": 2}}
    summary = {
        "model": "M",
        "data_dir": "d",
        "fold": 0,
        "datasets": {"Brats21": {"metrics": metrics}},
    }
    (ev / "summary.json").write_text(json.dumps(summary))
    rep = tmp_path / "rep"
    assert main(["report", str(ev), "-o", str(rep)]) == 0
    assert "results.md" in recorded(rep)["report"]
    assert main(["report", str(ev), "-o", str(rep)]) == 0  # its own files: replaced
    (rep / "results.csv").unlink()
    (rep / "results.csv").write_text("the user's now")  # still recorded: the name is report's
    assert main(["report", str(ev), "-o", str(rep)]) == 0
    capsys.readouterr()


def test_detect_writes_the_qc_flags_of_unusual_inputs(tmp_path, run, capsys):
    scans = tmp_path / "scans"
    _scan(scans / "clean.nii.gz")
    _scan(scans / "soft.nii.gz")
    _scan(scans / "soft_mask.nii.gz", (_brain() > 0) + np.float32(0.001))
    _scan(scans / "thick.nii.gz", affine=np.diag([6.0, 6.0, 9.0, 1.0]))
    out = tmp_path / "out"
    argv = ["detect", "--device", "cpu", "-q", "--model", str(run), "-i", str(scans)]
    assert main([*argv, "-o", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("maediff detect: warning: ") for line in err)
    assert any("soft.nii.gz: the brain mask holds values" in line for line in err)
    assert any("thick.nii.gz: voxel size 6x6x9 mm" in line for line in err)
    with (out / "scores.csv").open() as f:
        qc = {r["scan"]: r["qc"] for r in csv.DictReader(f)}
    # the untrained model holds no record of its training data: that flag follows the input's
    unchecked = "no_training_record"
    assert qc == {
        "clean": unchecked,
        "soft": f"mask_probabilistic;{unchecked}",
        "thick": f"voxel_size;{unchecked}",
    }
    # what detect wrote, and nothing else, is in the record
    written = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert sorted(recorded(out)["detect"]) == written


def test_input_flags_name_each_problem(tmp_path):
    from maediff.data.checks import input_flags

    img = nib.Nifti1Image(_brain(), MM6)
    assert input_flags(img, nib.Nifti1Image((_brain() > 0).astype(np.uint8), MM6), "x") == []
    c = nib.Nifti1Image(_brain().astype(np.complex64), np.diag([0.2, 0.2, 12.0, 1.0]))
    shifted = MM6.copy()
    shifted[:3, 3] = [0.0, 2.0, 0.0]
    mask = nib.Nifti1Image((_brain() > 0) * np.float32(0.7), shifted)
    assert input_flags(c, mask, "x") == [
        "complex",
        "voxel_size",
        "mask_probabilistic",
        "mask_affine",
    ]


def test_exported_models_and_checkpoints_follow_the_umask(tmp_path, run):
    from maediff.training.export import export_model

    old = os.umask(0o022)
    try:
        out = export_model(run, tmp_path / "model.safetensors")
        ckpt = save_weights(build_model(get_preset("dae-tiny")), tmp_path / "c.safetensors")
    finally:
        os.umask(old)
    for p in (out, ckpt):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, oct(p.stat().st_mode)


def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, run, capsys, monkeypatch):
    import maediff.weights as checkpoint

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")  # what a full disk leaves
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(checkpoint, "save_file", full)
    out = tmp_path / "share" / "model.safetensors"
    assert main(["export", str(run), "-o", str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"maediff export: error: cannot write {out}: ")
    assert "No space left on device" in line
    assert list(out.parent.iterdir()) == []


def test_a_read_only_output_names_the_file_once(tmp_path, monkeypatch):
    from maediff.data.io import save_like
    from maediff.outputs import temp_path

    def denied(img, filename):
        raise PermissionError(13, "Permission denied", filename)

    monkeypatch.setattr(nib, "save", denied)
    ref = nib.Nifti1Image(_brain(), MM6)
    final = tmp_path / "scan_anomaly.nii.gz"
    for target in (final, temp_path(final, ".nii.gz")):  # written directly, or staged by detect
        with pytest.raises(OSError) as e:
            save_like(_brain(), ref, target)
        assert str(e.value) == f"cannot write {final}: Permission denied"


def test_a_bids_data_set_reached_through_a_link(tmp_path):
    from maediff.data.bids import read_bids

    root = tmp_path / "real" / "ds"
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    _scan(root / "sub-01" / "anat" / "sub-01_T2w.nii.gz")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real")
    (s,) = read_bids(link / "ds")
    assert s.folder == "sub-01/anat" and s.name == "sub-01_T2w"


@pytest.mark.slow
def test_resume_names_a_log_with_binary_bytes(tmp_path, capsys):
    scans = tmp_path / "scans"
    for i in range(2):
        _scan(scans / f"s{i}.nii.gz", _brain() * (1 + 0.1 * i))
    run = tmp_path / "r"
    argv = ["train", "--device", "cpu", "-q", "--train-list", str(scans), "--run", str(run)]
    assert main([*argv, "--preset", "dae-tiny", "--steps", "2"]) == 0
    with (run / "log.csv").open("ab") as f:
        f.write(b"\x00\xff\xfe binary\n")
    capsys.readouterr()
    assert main(["train", "--device", "cpu", "-q", "--run", str(run), "--resume"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"{run / 'log.csv'} is not the training log this run wrote" in line
    shutil.rmtree(run)


@pytest.mark.slow
def test_a_full_disk_during_training_is_one_line_and_the_same_command_starts_again(
    tmp_path, capsys, monkeypatch
):
    """A checkpoint that cannot be written stops the run with one line naming it; the
    run folder then holds only the run's own files, so the same command, once there is
    space again, starts the run without --overwrite."""
    import maediff.weights as checkpoint

    real = checkpoint.save_file

    def full(tensors, filename, metadata=None):
        if "last.state" in filename:
            raise SafetensorError("Error while serializing: IoError(No space left on device)")
        return real(tensors, filename, metadata=metadata)

    scans = tmp_path / "scans"
    for i in range(2):
        _scan(scans / f"s{i}.nii.gz", _brain() * (1 + 0.1 * i))
    run = tmp_path / "r"
    argv = ["train", "--device", "cpu", "-q", "--train-list", str(scans), "--run", str(run)]
    argv += ["--preset", "dae-tiny", "--steps", "2"]
    monkeypatch.setattr(checkpoint, "save_file", full)
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"maediff train: error: cannot write {run / 'last.state.safetensors'}: ")
    assert not list(run.glob(".*.tmp*"))  # no temporary file left
    monkeypatch.setattr(checkpoint, "save_file", real)
    assert main(argv) == 0
    assert (run / "last.state.safetensors").is_file()
