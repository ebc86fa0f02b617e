"""Bad inputs, tried systematically. Each row of CASES is a command, the one line it
must print on stderr (a regular expression) and the files it must leave as they were
or must not create; a new case is a new row. The commands run in this process
(`maediff.cli.main`) against one folder of prepared good and bad files (`world`)."""

import gzip
import hashlib
import json
import re
import shlex
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from maediff.cli import main
from maediff.config import get_preset, save_config
from maediff.models import build_model
from maediff.weights import save_weights

BOMB = """a: &a [x, x, x, x, x, x, x, x, x]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
train: {lr: [*c, *c, *c, *c, *c, *c, *c, *c, *c]}
"""


@dataclass(frozen=True)
class Case:
    id: str
    argv: str  # after `maediff`; {w} is the world folder
    error: str  # the one stderr line, a regular expression (searched); "": none at all
    untouched: tuple[str, ...] = ()  # files under {w} whose bytes must not change
    absent: tuple[str, ...] = ()  # paths under {w} that must not be created
    rc: int = 2  # 2: the command stops; 1: detect reports a failed scan


DETECT = "detect --device cpu -q --model {w}/run -i {w}/scan.nii.gz"
TRAIN = "train --device cpu -q --train-list {w}/scans --run {w}/new --preset dae-tiny"

CASES = [
    # configuration files and --set values
    Case(
        "config-alias-bomb",
        "train --train-list {w}/scans --run {w}/new --config {w}/bomb.yaml",
        r"bomb\.yaml is not valid YAML: aliases \(\*name\) are not allowed",
        ("bomb.yaml",),
        ("new",),
    ),
    Case(
        "run-config-alias-bomb",
        "train --run {w}/bombrun --resume -q",
        r"bombrun/config\.yaml is not valid YAML: aliases",
        ("bombrun/config.yaml",),
    ),
    Case(
        "set-python-tag",
        TRAIN + " --set 'train.lr=!!python/object/apply:os.system [\"true\"]'",
        r"not plain YAML: could not determine a constructor",
        (),
        ("new",),
    ),
    Case(
        "set-alias",
        TRAIN + " --set 'train.lr=[&a [1], *a]'",
        r"not plain YAML: aliases",
        (),
        ("new",),
    ),
    Case(
        "set-long-value",
        TRAIN + " --set train.lr=[" + ",".join(["1"] * 500) + "]",
        r"train\.lr=\[1, 1, .{0,60}\.\.\. must be a number$",
        (),
        ("new",),
    ),
    Case(
        "max-steps-negative",
        TRAIN + " --set train.max_steps=-5",
        r"train\.max_steps=-5 must be >= 0",
        (),
        ("new",),
    ),
    Case(
        "epochs-negative",
        TRAIN + " --set train.epochs=-1",
        r"train\.epochs=-1 must be >= 1",
        (),
        ("new",),
    ),
    Case(
        "lr-infinite",
        TRAIN + " --set train.lr=.inf",
        r"train\.lr=inf must be a number > 0",
        (),
        ("new",),
    ),
    Case(
        "unknown-preset",
        "train --train-list {w}/scans --run {w}/new --preset dae-huge",
        r"unknown preset 'dae-huge'",
        (),
        ("new",),
    ),
    Case(
        "device-tpu",
        TRAIN.replace("--device cpu", "--device tpu"),
        r"device 'tpu' is not one of auto, cpu, cuda, cuda:N, mps",
        (),
        ("new",),
    ),
    Case(
        "nan-training-loss",
        TRAIN.replace("{w}/new", "{w}/nanloss") + " --set train.lr=1e30",
        r"training loss \(model\) became nan at step \d+; lower train\.lr",
    ),
    Case(
        "overwrite-too-big-for-memory",
        "train --device cpu -q --train-list {w}/scans --run {w}/oldrun "
        "--preset dae-tiny --overwrite --set train.batch_size=100000000000",
        r"needs about \d+.* are free there: --set train\.batch_size=\d+ would fit",
        ("oldrun/config.yaml", "oldrun/best.safetensors", "oldrun/last.safetensors"),
    ),
    # checkpoints
    Case(
        "nan-weights",
        DETECT.replace("{w}/run", "{w}/nanrun") + " -o {w}/out",
        r"nanrun/best\.safetensors holds NaN or Inf weights",
        ("nanrun/best.safetensors",),
        ("out",),
    ),
    Case(
        "tensor-of-wrong-shape",
        DETECT.replace("{w}/run", "{w}/shaperun") + " -o {w}/out",
        r"shaperun/best\.safetensors does not match its config \(dae\): 1 tensor\(s\) differ in shape",
        (),
        ("out",),
    ),
    Case(
        "config-without-its-section",
        DETECT.replace("{w}/run", "{w}/nosection") + " -o {w}/out",
        r"nosection/best\.safetensors does not match its config \(dae\)",
        (),
        ("out",),
    ),
    # detect's arguments: refused before any work
    Case(
        "detect-output-is-a-file",
        DETECT + " -o {w}/afile",
        r"output .*afile exists and is not a folder",
        ("afile",),
    ),
    Case(
        "detect-threshold-nan",
        DETECT + " -o {w}/out --threshold nan",
        r"--threshold nan must be a finite number",
        (),
        ("out",),
    ),
    Case(
        "detect-batch-size-negative",
        DETECT + " -o {w}/out --batch-size -1",
        r"--batch-size -1 must be >= 1",
        (),
        ("out",),
    ),
    Case(
        "detect-device-tpu",
        DETECT + " -o {w}/out --device tpu",
        r"device 'tpu' is not one of",
        (),
        ("out",),
    ),
    Case(
        "detect-missing-input",
        DETECT.replace("scan.nii.gz", "nothing.nii.gz") + " -o {w}/out",
        r"nothing\.nii\.gz does not exist",
        (),
        ("out",),
    ),
    # bad scans: detect reports the scan and goes on (exit 1)
    *[
        Case(
            f"scan-{name}",
            DETECT.replace("{w}/scan.nii.gz", "{w}/bad/" + name) + " -o {w}/out",
            "FAILED {w}/bad/" + re.escape(name) + ": " + reason,
            (f"bad/{name}",),
            rc=1,
        )
        for name, reason in [
            ("thin.nii.gz", r".*the brain covers no voxel of the model grid"),
            ("nan-affine.nii", r".*has NaN or Inf in its affine"),
            ("flat-affine.nii", r".*has a degenerate affine"),
            (
                "huge.nii.gz",
                r".*declares a .* volume of \d+\.\d GiB, more than the .* GiB of memory",
            ),
            ("truncated.nii.gz", r".*is unreadable or truncated"),
            ("four-d.nii.gz", r".*has 4 dimensions"),
            ("nan-voxels.nii.gz", r".*contains \d+ NaN or Inf voxels"),
            ("empty.nii.gz", r".*the image has no voxel > 0"),
        ]
    ],
    # evaluate and benchmark counts: no silent "all" or "all but the last"
    *[
        Case(
            f"evaluate-max-volumes-{n}",
            "evaluate --device cpu -q --model {w}/run --data {w}/nodata "
            f"-o {{w}}/ev --max-volumes {n}",
            rf"--max-volumes {n}: give a number of volumes >= 1",
            (),
            ("ev",),
        )
        for n in (-1, 0)
    ],
    Case(
        "benchmark-minutes-negative",
        "benchmark --models dae --scale tiny -o {w}/bench --minutes -1",
        r"--minutes -1\.0 must be a number of minutes > 0",
        (),
        ("bench",),
    ),
    Case(
        "benchmark-steps-zero",
        "benchmark --models dae --scale tiny -o {w}/bench --steps 0",
        r"--steps 0 must be >= 1",
        (),
        ("bench",),
    ),
    Case(
        "benchmark-max-volumes-zero",
        "benchmark --models dae --scale tiny -o {w}/bench --max-volumes 0",
        r"--max-volumes 0 must be >= 1",
        (),
        ("bench",),
    ),
]


# ------------------------------------------------------------------ issue 41: outputs
# A command writes only what it declares, records it, replaces only what it recorded;
# names never lead out of -o; what can be checked is checked before the work.

CALIBRATE = "calibrate --device cpu -q --model {w}/run --bootstrap 10"
REPORT = "report {w}/evals/a"

CASES += [
    Case(  # 1
        "detect-keeps-a-users-scores-csv",
        DETECT + " -o {w}/userout",
        r"userout/scores\.csv exists \(not written by maediff detect\); pass --overwrite",
        ("userout/scores.csv",),
        ("userout/scan_anomaly.nii.gz",),
    ),
    Case(  # 2
        "calibrate-keeps-its-input-list",
        CALIBRATE + " -i {w}/calin/scans.csv -o {w}/calin",
        r"calin/scans\.csv is an input of this command and its output scans\.csv",
        ("calin/scans.csv",),
        ("calin/calibration.json",),
    ),
    Case(
        "calibrate-keeps-a-users-calibration-md",
        CALIBRATE + " -i {w}/scans -o {w}/calmd",
        r"calmd/calibration\.md exists \(not written by maediff calibrate\)",
        ("calmd/calibration.md",),
        ("calmd/calibration.json", "calmd/scans.csv"),
    ),
    Case(  # 3
        "train-keeps-its-config",
        "train --device cpu -q --train-list {w}/scans --run {w}/myproj "
        "--config {w}/myproj/config.yaml --steps 1 --overwrite",
        r"myproj/config\.yaml is an input of this command and its output config\.yaml",
        ("myproj/config.yaml",),
        ("myproj/best.safetensors",),
    ),
    Case(
        "train-keeps-a-users-log",
        TRAIN.replace("{w}/new", "{w}/userlog") + " --steps 1",
        r"userlog/(log\.csv|model_card\.md) exists \(not written by maediff train\)",
        ("userlog/log.csv", "userlog/model_card.md"),
        ("userlog/best.safetensors", "userlog/config.yaml"),
    ),
    Case(  # 4
        "report-keeps-a-users-results",
        REPORT + " -o {w}/userrep",
        r"userrep/results\.(md|csv) exists \(not written by maediff report\)",
        ("userrep/results.csv", "userrep/results.md"),
        ("userrep/report.html",),
    ),
    Case(
        "report-never-rewrites-an-evaluation",
        "report {w}/evals/b --overwrite -o {w}/evals/a",
        r"evals/a is an evaluation folder \(it holds summary\.json\)",
        ("evals/a/summary.json", "evals/a/results.md"),
        ("evals/a/report.html",),
    ),
    Case(  # 5
        "csv-name-leading-out-of-the-output",
        DETECT.replace("{w}/scan.nii.gz", "{w}/lists/escape.csv") + " -o {w}/out",
        r"escape\.csv line 2: name '\.\./escaped' cannot name an output file",
        (),
        ("out", "escaped_anomaly.nii.gz"),
    ),
    Case(
        "csv-name-absolute",
        DETECT.replace("{w}/scan.nii.gz", "{w}/lists/absolute.csv") + " -o {w}/out",
        r"absolute\.csv line 2: name '/tmp/x' cannot name an output file",
        (),
        ("out",),
    ),
    Case(  # 6
        "detect-output-beside-the-scan",
        DETECT + " -o {w}",
        r"output folder .* holds the input scan .*scan\.nii\.gz: a later call would read the maps",
        ("scan.nii.gz",),
        ("scan_anomaly.nii.gz", "scores.csv"),
    ),
    Case(  # 7
        "report-different-test-sets",
        "report {w}/evals/a {w}/evals/b -o {w}/rep",
        r"MAEDiff: .*evals/a has 2 BraTS21 test volumes and .*evals/b 1: runs of different test sets",
        (),
        ("rep",),
    ),
    Case(
        "report-one-evaluation-twice",
        "report {w}/evals/a {w}/evals/a -o {w}/rep",
        r"evaluation .*evals/a is given twice \(arguments 1 and 2\)",
        (),
        ("rep",),
    ),
    Case(  # 8
        "tensor-of-another-dtype",
        DETECT.replace("{w}/run", "{w}/int32run") + " -o {w}/out",
        r"int32run/best\.safetensors does not match its config \(dae\): 1 tensor\(s\) differ "
        r"in type, e\.g\. .* torch\.int32 in the file, torch\.float32 in the model",
        (),
        ("out",),
    ),
    Case(  # 9
        "train-list-with-a-lesion-label",
        TRAIN.replace("{w}/scans", "{w}/labelled"),
        r"labelled: 1 scan\(s\) have lesion labels \(.*s1_seg\.nii\.gz\); train on healthy",
        (),
        ("new",),
    ),
    # 10: valid but unusual: scored, one warning naming the scan, a flag in scores.csv
    *[
        Case(
            f"unusual-{name}",
            DETECT.replace("{w}/scan.nii.gz", "{w}/odd/" + name + ".nii.gz") + " -o {w}/oddout",
            r"maediff detect: warning: .*odd/" + re.escape(name) + r"\.nii\.gz: " + words,
            (f"odd/{name}.nii.gz",),
            rc=0,
        )
        for name, words in [
            ("thin-slices", r"voxel size 0\.2x0\.2x12 mm is outside 0\.3-7 mm"),
            ("ten-mm", r"voxel size 10x10x10 mm is outside"),
            ("soft-mask", r"the brain mask holds values other than 0 and 1 \(e\.g\. 0\.001\)"),
            ("shifted-mask", r"the brain mask's affine differs from the image's by up to 40 mm"),
            ("complex", r"the image is complex-valued; its magnitude is scored"),
        ]
    ],
    Case(  # 11
        "export-calibration-nan",
        "export {w}/run -o {w}/model.safetensors --calibration {w}/cal-nan",
        r"cal-nan/calibration\.json: the threshold of a threshold is nan, not a finite number",
        (),
        ("model.safetensors",),
    ),
    # tracebacks before
    Case(
        "scan-rgb24",
        DETECT.replace("{w}/scan.nii.gz", "{w}/lists/rgb.csv") + " -o {w}/out",
        r"FAILED .*rgb\.nii\.gz: image file .* holds colour voxels \(R, G, B\); a single-channel",
        (),
        rc=1,
    ),
    Case(
        "csv-empty-image-cell",
        DETECT.replace("{w}/scan.nii.gz", "{w}/lists/empty-cell.csv") + " -o {w}/out",
        r"empty-cell\.csv line 3: the 'image' cell is empty",
        (),
        ("out",),
    ),
    *[
        Case(
            f"model-extra-{kind}",
            DETECT.replace("{w}/run", "{w}/extra-" + kind) + " -o {w}/out",
            rf"extra-{kind}/best\.safetensors: its metadata 'extra' is {typ}, not a JSON object",
            (),
            ("out",),
        )
        for kind, typ in (("list", "list"), ("null", "NoneType"))
    ],
    *[
        Case(
            f"calibrate-bootstrap-{n}",
            CALIBRATE.replace("--bootstrap 10", f"--bootstrap {n}") + " -i {w}/scans -o {w}/cal",
            rf"--bootstrap {n} must be >= 1",
            (),
            ("cal",),
        )
        for n in (0, -3)
    ],
    # unclear messages before
    Case(
        "calibration-threshold-not-a-number",
        DETECT + " -o {w}/out --threshold-from {w}/cal-high --fpr 0.01",
        r"cal-high/calibration\.json: the threshold of a threshold is 'high', not a finite number",
        (),
        ("out",),
    ),
    Case(
        "csv-with-byte-order-mark",
        DETECT.replace("{w}/scan.nii.gz", "{w}/lists/bom.csv") + " -o {w}/bomout",
        "",
        rc=0,
    ),
    Case(
        "scan-int16-scaled-beyond-float",
        DETECT.replace("{w}/scan.nii.gz", "{w}/lists/scaled.csv") + " -o {w}/out",
        r"FAILED .*scaled\.nii: image file .*: its header's scaling \(scl_slope 1e\+36, "
        r"scl_inter 0\) takes \d+ of its int16 voxels beyond the float range",
        (),
        rc=1,
    ),
    Case(
        "volume-shape-zero",
        TRAIN + " --set data.volume_shape=[0,0,0]",
        r"data\.volume_shape=\(0, 0, 0\) must hold voxel counts >= 1",
        (),
        ("new",),
    ),
    Case(
        "ensemble-t-beyond-the-schedule",
        DETECT.replace("{w}/run", "{w}/mrun") + " -o {w}/out --set inference.ensemble_t=[5000]",
        r"inference\.ensemble_t=\[5000\] must hold timesteps in 1\.\.\d+ \(diffusion\.timesteps\)",
        (),
        ("out",),
    ),
    Case(
        "calibrate-rate-above-one",
        CALIBRATE + " -i {w}/scans -o {w}/cal --fpr 5",
        r"--fpr 5 is not a rate: give fractions in \(0, 1\), e\.g\. 0\.01 for 1 %",
        (),
        ("cal",),
    ),
    Case(
        "detect-rate-one",
        DETECT + " -o {w}/out --fpr 1",
        r"--fpr 1 is not a rate: give a fraction in \(0, 1\)",
        (),
        ("out",),
    ),
]


def _scan(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(
        nib.Nifti1Image(data.astype(np.float32), np.eye(4) if affine is None else affine), path
    )
    return path


MM6 = np.diag([6.0, 6.0, 6.0, 1.0])  # the tiny presets' grid: 6 mm voxels


def _brain(shape=(32, 32, 8)) -> np.ndarray:
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    return np.where(x**2 + y**2 + z**2 < 0.6, 1.0 + 0.2 * x, 0.0)


def _run(folder: Path, preset: str = "dae-tiny", tensors=None, config=None) -> Path:
    """A run folder without training: the model's initial weights (or `tensors`) and config."""
    folder.mkdir(parents=True)
    model = build_model(get_preset(preset))
    save_config(model.cfg, folder / "config.yaml")
    path = save_weights(model, folder / "best.safetensors")
    if tensors is not None or config is not None:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        if config is not None:
            meta["config"] = json.dumps(config(json.loads(meta["config"])))
        save_file(
            tensors(load_file(str(path))) if tensors else load_file(str(path)), str(path), meta
        )
    return folder


def _scan_with_srow(path: Path, row: int, values: tuple[float, ...]) -> None:
    """A scan whose affine row `row` (the header's srow_x/y/z) nibabel would not write."""
    raw = bytearray(_scan(path, _brain()).read_bytes())
    struct.pack_into("<4f", raw, 280 + 16 * row, *values)
    struct.pack_into("<hh", raw, 252, 0, 1)  # qform_code 0, sform_code 1: srow is the affine
    path.write_bytes(bytes(raw))


def _bad_scans(bad: Path) -> None:
    bad.mkdir()
    _scan(bad / "thin.nii.gz", np.random.default_rng(0).random((1, 1, 500)) + 0.5)
    _scan_with_srow(bad / "nan-affine.nii", 0, (float("nan"), 0.0, 0.0, 0.0))
    _scan_with_srow(bad / "flat-affine.nii", 2, (0.0, 0.0, 0.0, 0.0))
    header = nib.Nifti1Header()  # 2^40 voxels of float32 declared, a few bytes given
    header.set_data_shape((2**14, 2**14, 2**12))
    header.set_data_dtype(np.float32)
    with gzip.open(bad / "huge.nii.gz", "wb") as f:
        f.write(header.binaryblock + b"\0" * 4 + b"\0" * 4096)
    whole = _scan(bad / "whole.nii.gz", _brain()).read_bytes()
    (bad / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
    (bad / "whole.nii.gz").unlink()
    _scan(bad / "four-d.nii.gz", np.stack([_brain(), _brain()], -1))
    nan_voxels = _brain()
    nan_voxels[10, 10, 4] = np.nan
    _scan(bad / "nan-voxels.nii.gz", nan_voxels)
    _scan(bad / "empty.nii.gz", np.zeros((32, 32, 8)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = tmp_path_factory.mktemp("world")
    _scan(w / "scan.nii.gz", _brain(), MM6)
    (w / "scans").mkdir()
    for i in range(2):
        _scan(w / "scans" / f"s{i}.nii.gz", _brain() * (1 + 0.1 * i), MM6)
    (w / "bomb.yaml").write_text(BOMB)
    (w / "afile").write_text("a file of the user's\n")
    _run(w / "run")
    (w / "bombrun").mkdir()
    (w / "bombrun" / "config.yaml").write_text(BOMB)
    first = lambda t: next(iter(t))  # noqa: E731
    _run(
        w / "nanrun", tensors=lambda t: {**t, first(t): torch.full_like(t[first(t)], float("nan"))}
    )
    _run(w / "shaperun", tensors=lambda t: {**t, first(t): torch.zeros(t[first(t)].numel() + 1)})
    _run(w / "nosection", config=lambda c: {k: v for k, v in c.items() if k != "dae"})
    old = _run(w / "oldrun")
    (old / "last.safetensors").write_bytes((old / "best.safetensors").read_bytes())
    _bad_scans(w / "bad")
    _issue41_world(w)
    return w


def _calibration(folder: Path, threshold) -> None:
    folder.mkdir()
    t = {"fpr": 0.01, "threshold": threshold, "ci_low": None, "ci_high": None}
    t |= {"voxel_fpr_after_components": 0.01, "scans_flagged": 0}
    cal = {"format": "maediff-calibration-v1", "thresholds": [t], "scans": ["s0"]}
    cal |= {"scan_scores": [0.1], "n_voxels": 100, "model": {}, "scoring": {}, "postprocess": {}}
    (folder / "calibration.json").write_text(json.dumps(cal))


def _evaluation(folder: Path, n_test: int) -> None:
    folder.mkdir(parents=True)
    metrics = {"dice": {"mean": 0.5, "std": 0.0, "n": n_test}}
    summary = {"model": "MAEDiff", "data_dir": str(folder.parent / "data"), "fold": 0}
    summary["datasets"] = {"Brats21": {"metrics": metrics, "n_test": n_test}}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "results.md").write_text("the evaluation's own table\n")


def _issue41_world(w: Path) -> None:
    """The files of the issue-41 rows: a user's files where commands write, lists with
    names that leave -o, odd scans, crafted model files and calibrations."""
    (w / "userout").mkdir()
    (w / "userout" / "scores.csv").write_text("subject,my_column\nx,1\n")
    (w / "calin").mkdir()
    (w / "calin" / "scans.csv").write_text("image\n../scans/s0.nii.gz\n../scans/s1.nii.gz\n")
    (w / "calmd").mkdir()
    (w / "calmd" / "calibration.md").write_text("# my notes\n")
    (w / "myproj").mkdir()
    cfg = get_preset("dae-tiny")
    save_config(cfg, w / "myproj" / "config.yaml")
    with (w / "myproj" / "config.yaml").open("a") as f:
        f.write("# my comment\n")
    (w / "userlog").mkdir()
    (w / "userlog" / "log.csv").write_text("my,log\n")
    (w / "userlog" / "model_card.md").write_text("my card\n")
    (w / "userrep").mkdir()
    (w / "userrep" / "results.csv").write_text("mine\n")
    (w / "userrep" / "results.md").write_text("mine\n")
    _evaluation(w / "evals" / "a", 2)
    _evaluation(w / "evals" / "b", 1)
    lists = w / "lists"
    lists.mkdir()
    (lists / "escape.csv").write_text("image,name\n../scan.nii.gz,../escaped\n")
    (lists / "absolute.csv").write_text("image,name\n../scan.nii.gz,/tmp/x\n")
    (lists / "empty-cell.csv").write_text("image,name\n../scan.nii.gz,a\n,b\n")
    (lists / "bom.csv").write_bytes("\ufeffimage\n../scan.nii.gz\n".encode())
    (lists / "rgb.csv").write_text("image\nrgb/rgb.nii.gz\n")
    (lists / "rgb").mkdir()
    rgb = np.zeros((8, 8, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, MM6), lists / "rgb" / "rgb.nii.gz")
    (lists / "scaled.csv").write_text("image\nscaled/scaled.nii\n")
    (lists / "scaled").mkdir()
    scaled = nib.Nifti1Image((_brain() * 1000).astype(np.int16), MM6)
    scaled.header.set_slope_inter(1e36, 0.0)
    nib.save(scaled, lists / "scaled" / "scaled.nii")
    labelled = w / "labelled"
    labelled.mkdir()
    for i in range(2):
        _scan(labelled / f"s{i}.nii.gz", _brain(), MM6)
    _scan(labelled / "s1_seg.nii.gz", np.zeros((32, 32, 8)), MM6)
    _run(
        w / "int32run",
        tensors=lambda t: {k: v.to(torch.int32) if k == next(iter(t)) else v for k, v in t.items()},
    )
    for kind, extra in (("list", "[]"), ("null", "null")):
        folder = _run(w / f"extra-{kind}")
        path = folder / "best.safetensors"
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        save_file(load_file(str(path)), str(path), {**meta, "extra": extra})
    _run(w / "mrun", preset="maediff-tiny")
    _calibration(w / "cal-nan", float("nan"))
    _calibration(w / "cal-high", "high")
    odd = w / "odd"
    odd.mkdir()
    _scan(odd / "thin-slices.nii.gz", _brain((256, 256, 8)), np.diag([0.2, 0.2, 12.0, 1.0]))
    _scan(odd / "ten-mm.nii.gz", _brain(), np.diag([10.0, 10.0, 10.0, 1.0]))
    _scan(odd / "soft-mask.nii.gz", _brain(), MM6)
    _scan(odd / "soft-mask_mask.nii.gz", (_brain() > 0) + 0.001, MM6)
    _scan(odd / "shifted-mask.nii.gz", _brain(), MM6)
    shifted = MM6.copy()
    shifted[0, 3] = 40.0
    _scan(odd / "shifted-mask_mask.nii.gz", (_brain() > 0).astype(float), shifted)
    complex_brain = (_brain() * (0.6 + 0.8j)).astype(np.complex64)
    nib.save(nib.Nifti1Image(complex_brain, MM6), odd / "complex.nii.gz")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_bad_input_gives_one_clear_line_and_touches_nothing(case, world, capsys):
    argv = case.argv.replace("{w}", str(world))
    kept = {p: _digest(world / p) for p in case.untouched}
    capsys.readouterr()
    try:
        rc = main(shlex.split(argv))
    finally:  # each row on the same world: what a failing row wrote is checked, then removed
        created = [p for p in case.absent if (world / p).exists()]
        for p in created:
            shutil.rmtree(world / p)
    assert not created, f"{created} were created"
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == case.rc, err
    if not case.error:  # a bad-looking input that is fine: no word on stderr
        assert err == []
        return
    assert len(err) == 1, f"expected one line on stderr, got {len(err)}:\n" + "\n".join(err[:20])
    assert re.search(case.error.replace("{w}", re.escape(str(world))), err[0]), err[0]
    assert "Traceback" not in err[0] and len(err[0]) < 1500, err[0]
    for p, digest in kept.items():
        assert _digest(world / p) == digest, f"{p} was changed"


# ------------------------------------------------------------------ beyond one command


def test_resume_with_set_names_only_the_keys_it_changes(world, capsys):
    """--resume --set without --preset: compared with the run's own configuration, not
    with the default preset's (which differed in some 60 keys that were all listed)."""
    with pytest.raises(SystemExit) as e:
        main(shlex.split(f"train --device cpu -q --run {world}/run --resume --set train.lr=0.01"))
    assert e.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.search(r"the options given change train\.lr \(0\.001 -> 0\.01\) \(start", line), line


def test_a_killed_train_overwrite_never_leaves_the_new_config_beside_old_weights(
    world, tmp_path, monkeypatch
):
    """The earlier run's checkpoints go before the new config.yaml is written: killed
    right after that write, the folder holds no weights that the config does not describe."""
    import maediff.training.trainer as trainer

    run = tmp_path / "run"
    shutil.copytree(world / "oldrun", run)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the moment after config.yaml is written

    monkeypatch.setattr(trainer, "speed_up", killed)
    argv = f"train --device cpu -q --train-list {world}/scans --run {run} --preset dae-tiny"
    assert main([*argv.split(), "--overwrite", "--set", "train.lr=0.005"]) == 130
    assert "lr: 0.005" in (run / "config.yaml").read_text()
    assert not list(run.glob("*.safetensors"))


def test_a_truncated_figure3_file_is_named(tmp_path):
    from maediff.reporting.benchmark import figure3

    folder = tmp_path / "runs" / "dae" / "fold0-seed0"
    folder.mkdir(parents=True)
    np.savez(folder / "figure3.npz", **{"0|s|image": np.zeros((4, 4))})
    data = (folder / "figure3.npz").read_bytes()
    (folder / "figure3.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ValueError, match=r"figure3\.npz is truncated or corrupted .*delete the run's folder"
    ):
        figure3([("DAE", folder / "figure3.npz")], tmp_path / "figure3.png")


def test_the_model_contract_names_a_reconstruction_of_the_wrong_shape():
    from maediff.models import AnomalyModel

    class Halves(AnomalyModel):  # not registered: the registry stays as it is
        registry_name = "halves"

        def reconstruct_batch(self, x):
            return x[..., ::2, ::2]

    x = torch.rand(3, 1, 32, 32)
    with pytest.raises(
        ValueError,
        match=r"'halves' \(Halves\) breaks the model contract .*"
        r"reconstruct_batch returned \(3, 1, 16, 16\) for an input of shape \(3, 1, 32, 32\)",
    ):
        Halves(get_preset("dae-tiny")).reconstruct(x)


def test_a_reconstruction_with_nan_is_an_error_not_a_map():
    model = build_model(get_preset("dae-tiny"))
    with torch.no_grad():
        next(iter(model.parameters())).fill_(float("nan"))
    with pytest.raises(ValueError, match=r"the reconstruction of model 'dae' holds \d+ NaN or Inf"):
        model.reconstruct(torch.rand(2, 1, 32, 32))


def test_the_naming_rule_is_enforced_when_a_model_registers():
    from maediff.registry import SPECS, ModelSpec, Preset, register_spec

    with pytest.raises(ValueError, match="model 'zz' has no preset of its own name"):
        register_spec(ModelSpec("zz", presets=(Preset("zz-other", "ZZ"),)))
    assert "zz" not in SPECS


PLUGINS = {
    "syntax": "def broken(:\n",
    "clash": (
        "from maediff.registry import Preset\n"
        "from maediff.models import AnomalyModel, register_model\n"
        "@register_model('dae', presets=(Preset('dae', 'DAE again'),))\n"
        "class Again(AnomalyModel):\n    pass\n"
    ),
    "unnamed": (  # a preset name against the rule, and a section it registered first
        "from dataclasses import dataclass\n"
        "from maediff.registry import Preset, register_section\n"
        "from maediff.models import AnomalyModel, register_model\n"
        "@dataclass(frozen=True)\nclass S:\n    width: int = 1\n"
        "register_section('unnamedsec', S)\n"
        "@register_model('unnamed', sections=('unnamedsec',), presets=(Preset('Bad Name', 'U'),))\n"
        "class U(AnomalyModel):\n    pass\n"
    ),
}


def test_a_broken_plugin_costs_only_itself(tmp_path, monkeypatch, capsys):
    """Three installed plug-ins that fail (a syntax error, a clash with a built-in model,
    a preset name against the rule), found on the path as `pip install` places them:
    loading them raises nothing (so --version and --help work), each gives one warning
    naming its package and how to remove it, what they registered is taken back, the
    built-in models work, and asking for one of them names why it is missing."""
    from maediff import registry
    from maediff.models import MODELS, PluginWarning, load_plugins

    site = tmp_path / "site"
    site.mkdir()
    entry = ["[maediff.models]"]
    for name, code in PLUGINS.items():
        (site / f"plug_{name}.py").write_text(code)
        entry.append(f"{name} = plug_{name}")
    info = site / "maediff_broken-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: maediff-broken\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("\n".join(entry) + "\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(registry, "PLUGIN_FAILURES", {})
    models, sections = dict(MODELS), dict(registry.SECTIONS)
    with pytest.warns(PluginWarning) as warned:
        assert load_plugins() == []
    texts = [str(w.message) for w in warned]
    assert len(texts) == 3 and all("pip uninstall maediff-broken" in t for t in texts), texts
    assert any("SyntaxError" in t for t in texts) and any("registered twice" in t for t in texts)
    assert MODELS == models and registry.SECTIONS == sections  # 'unnamedsec' taken back
    assert get_preset("dae-tiny").model == "dae"
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "maediff 0." in capsys.readouterr().out
    argv = [
        "train",
        "--train-list",
        "none",
        "--run",
        str(tmp_path / "r"),
        "--preset",
        "unnamed-tiny",
    ]
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("maediff train: error: unknown preset 'unnamed-tiny'")
    assert "plug-in 'unnamed' of package maediff-broken" in line and "Bad Name" in line
    assert not (tmp_path / "r").exists()
