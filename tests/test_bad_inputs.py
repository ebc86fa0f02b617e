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
    error: str  # the one stderr line, a regular expression (searched)
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
    return w


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
    assert len(err) == 1, f"expected one line on stderr, got {len(err)}:\n" + "\n".join(err[:20])
    assert re.search(case.error.replace("{w}", re.escape(str(world))), err[0]), err[0]
    assert "Traceback" not in err[0] and len(err[0]) < 1500, err[0]
    for p, digest in kept.items():
        assert _digest(world / p) == digest, f"{p} was changed"


# ------------------------------------------------------------------ beyond one command


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
