"""The contract of bad input, generated (hypothesis): for any CSV list, NIfTI header and
model-file metadata drawn here, `maediff detect` gives a correct result or one line
naming the file and the problem (a failed scan: one FAILED line per scan, the others
done), writes nothing outside -o and replaces no file in -o that it did not write.
Few examples at the tiny scale (dae-tiny, 32x32x8 volumes): the rows of
tests/test_bad_inputs.py are the cases found so far; this looks for the next ones."""

import hashlib
import json
import re
import shlex
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from maediff.cli import main
from maediff.config import get_preset, save_config
from maediff.models import build_model
from maediff.training.checkpoint import save_weights

SETTINGS = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # the same examples on every run: a failure is reproduced by rerunning
)


def _brain(shape=(32, 32, 8)) -> np.ndarray:
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    return np.where(x**2 + y**2 + z**2 < 0.6, 1.0 + 0.2 * x, 0.0)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """An untrained dae-tiny (its initial weights, as a run saves them)."""
    folder = tmp_path_factory.mktemp("model")
    model = build_model(get_preset("dae-tiny"))
    save_config(model.cfg, folder / "config.yaml")
    return save_weights(model, folder / "best.safetensors")


def _files(root: Path, skip: Path) -> dict[str, str]:
    """Every file under `root` but those under `skip`, with its digest."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and skip not in p.parents
    }


def _detect(
    root: Path, model: Path, inputs: Path, out: Path, capsys, command: str = "detect"
) -> tuple[int, list[str]]:
    """detect (or calibrate), and the contract that holds whatever the input: nothing
    outside `out` changes, no file of the user's in `out` changes, no traceback, every
    stderr line one of the kinds a user is told about."""
    outside = _files(root, out)
    users = _files(out, out / "nothing") if out.is_dir() else {}
    capsys.readouterr()
    argv = f"{command} --device cpu -q --model {shlex.quote(str(model))} -o {shlex.quote(str(out))}"
    if command == "calibrate":
        argv += " --bootstrap 10"
    rc = main([*shlex.split(argv), "-i", str(inputs)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert _files(root, out) == outside, "a file outside -o was written or changed"
    after = _files(out, out / "nothing") if out.is_dir() else {}
    assert {k: after.get(k) for k in users} == users, (
        "a file in -o that detect did not write changed"
    )
    assert not any("Traceback" in line for line in err), err
    for line in err:
        assert re.match(rf"(maediff {command}: (error|warning): |  FAILED )", line), line
        assert len(line) < 1500
    if rc == 2:
        assert len(err) == 1, err  # one line, and it names a file or an option
        assert str(root) in err[0] or "--" in err[0], err[0]
    return rc, err


# ------------------------------------------------------------------ CSV lists

# valid cells drawn more often than broken ones, so that both outcomes are seen
NAMES = st.one_of(
    st.none(),
    st.text(alphabet="abc-_ 1", min_size=1, max_size=6),
    st.sampled_from(["../escaped", "/abs/x", "a/b", ".hidden", "-dash", "with space", ".."]),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12),
)
IMAGES = st.sampled_from(
    ["scan.nii.gz"] * 3
    + ["sub dir/scan two.nii.gz"] * 2
    + ["", "missing.nii.gz", "../outside.nii.gz"]
)
ROW = st.tuples(IMAGES, NAMES)


@SETTINGS
@given(
    rows=st.lists(ROW, min_size=1, max_size=2),
    bom=st.booleans(),
    user_file=st.sampled_from(
        [None, None, "notes.txt", "scores.csv", "ok_anomaly.nii.gz", "scans.csv"]
    ),
    command=st.sampled_from(["detect", "calibrate"]),
)
def test_any_csv_list_gives_maps_or_one_line(model_file, capsys, rows, bom, user_file, command):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data"
        for rel in ("scan.nii.gz", "sub dir/scan two.nii.gz"):
            (data / rel).parent.mkdir(parents=True, exist_ok=True)
            nib.save(
                nib.Nifti1Image(_brain().astype(np.float32), np.diag([6.0, 6, 6, 1])), data / rel
            )
        nib.save(
            nib.Nifti1Image(_brain().astype(np.float32), np.diag([6.0, 6, 6, 1])),
            root / "outside.nii.gz",
        )
        lines = ["image,name"] + [
            ",".join(json.dumps(v) if v else "" for v in (image, name)) for image, name in rows
        ]
        text = "\n".join(lines) + "\n"
        (data / "list.csv").write_bytes(("\ufeff" if bom else "").encode() + text.encode())
        out = root / "out"
        if user_file:
            out.mkdir()
            (out / user_file).write_text("the user's")
        rc, err = _detect(root, model_file, data / "list.csv", out, capsys, command)
        if rc == 0 and command == "detect":  # every listed scan has its maps, inside out/
            made = sorted(p.name for p in out.glob("*_anomaly.nii.gz"))
            assert len(made) == len(rows) and all(out in p.parents for p in out.rglob("*"))
        if rc == 0 and command == "calibrate":  # one calibration of every listed scan
            cal = json.loads((out / "calibration.json").read_text())
            assert len(cal["scans"]) == len(rows)
        assert rc in ((0, 1, 2) if command == "detect" else (0, 2))


# ------------------------------------------------------------------ NIfTI headers


@SETTINGS
@given(
    zooms=st.tuples(*[st.sampled_from([0.2, 1.0, 6.0, 12.0])] * 3),
    dtype=st.sampled_from(["float32", "int16", "uint8", "complex64", "float64"]),
    slope=st.sampled_from([None, 1.0, 0.5, 1e36]),
    mask=st.sampled_from([None, "binary", "soft", "shifted", "other-shape"]),
)
def test_any_header_gives_a_map_or_a_failed_line(model_file, capsys, zooms, dtype, slope, mask):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        scans = root / "scans"
        scans.mkdir()
        affine = np.diag([*zooms, 1.0])
        values = (_brain() * 100).astype(dtype)
        img = nib.Nifti1Image(values, affine)
        if slope is not None:
            img.header.set_slope_inter(slope, 0.0)
        nib.save(img, scans / "s.nii.gz")
        brain = (_brain() > 0).astype(np.float32)
        if mask == "binary":
            nib.save(nib.Nifti1Image(brain, affine), scans / "s_mask.nii.gz")
        elif mask == "soft":
            nib.save(nib.Nifti1Image(brain + np.float32(0.001), affine), scans / "s_mask.nii.gz")
        elif mask == "shifted":
            moved = affine.copy()
            moved[0, 3] = 40.0
            nib.save(nib.Nifti1Image(brain, moved), scans / "s_mask.nii.gz")
        elif mask == "other-shape":
            nib.save(nib.Nifti1Image(brain[:16], affine), scans / "s_mask.nii.gz")
        out = root / "out"
        rc, err = _detect(root, model_file, scans, out, capsys)
        assert rc in (0, 1), err  # one scan: scored, or reported and skipped
        if rc == 1:
            (failed,) = [line for line in err if "FAILED" in line]
            assert str(scans / "s.nii.gz") in failed
        else:
            assert (out / "s_anomaly.nii.gz").is_file()
            flags = (out / "scores.csv").read_text().splitlines()[1].rsplit(",", 1)[1]
            # a flag for every unusual property, and a warning naming the scan for each
            expected = set()
            if dtype == "complex64":
                expected.add("complex")
            if any(not 0.3 <= z <= 7 for z in zooms):
                expected.add("voxel_size")
            if mask == "soft":
                expected.add("mask_probabilistic")
            if mask == "shifted":
                expected.add("mask_affine")
            # the untrained model has no record of its training data: one flag, one warning
            assert set(filter(None, flags.split(";"))) == expected | {"no_training_record"}
            warned = [line for line in err if "warning" in line and "records nothing" not in line]
            assert len(warned) == len(expected)


# ------------------------------------------------------------------ model-file metadata

EXTRA = st.sampled_from(['{"step": 3}', "[]", "null", "3", '"text"', "{not json"])
FORMAT = st.sampled_from(["maediff-checkpoint-v1", "maediff-checkpoint-v9", "other", None])
CONFIG = st.sampled_from(["valid", "not json", "no section", "unknown model", None])
DTYPE = st.sampled_from([torch.float32, torch.float16, torch.int32, torch.float64])


@SETTINGS
@given(extra=EXTRA, fmt=FORMAT, config=CONFIG, dtype=DTYPE)
def test_any_model_metadata_loads_right_or_is_named(model_file, capsys, extra, fmt, config, dtype):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with safe_open(str(model_file), framework="pt") as f:
            meta = dict(f.metadata())
        tensors = load_file(str(model_file))
        first = next(iter(tensors))
        tensors[first] = tensors[first].to(dtype)
        meta["extra"] = extra
        if fmt is None:
            meta.pop("format")
        else:
            meta["format"] = fmt
        cfg = json.loads(meta["config"])
        if config is None:
            meta.pop("config")
        elif config == "not json":
            meta["config"] = "{config"
        elif config == "no section":
            meta["config"] = json.dumps({k: v for k, v in cfg.items() if k != "dae"})
        elif config == "unknown model":
            meta["config"] = json.dumps({**cfg, "model": "nosuchmodel"})
        path = root / "m.safetensors"
        save_file(tensors, str(path), meta)
        nib.save(
            nib.Nifti1Image(_brain().astype(np.float32), np.diag([6.0, 6, 6, 1])), root / "s.nii.gz"
        )
        out = root / "out"
        rc, err = _detect(root, path, root / "s.nii.gz", out, capsys)
        good = (
            extra.startswith("{") and extra != "{not json"
            and fmt == "maediff-checkpoint-v1"
            and config == "valid"
            and dtype == torch.float32
        )  # fmt: skip
        if good:
            assert rc == 0 and (out / "s_anomaly.nii.gz").is_file(), err
        else:  # refused before any output, the model file named
            assert rc == 2 and str(path) in err[0], err
            assert not out.exists()
