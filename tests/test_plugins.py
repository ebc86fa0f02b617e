"""A model of another package (docs/plugins.md): the page's module and entry point,
placed on the Python path as `pip install` would place them, then the page's commands
in fresh processes: train, evaluate, detect and benchmark --models."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.S)


def _install(site: Path) -> None:
    """The module and a dist-info folder with the entry point of the page's pyproject."""
    (code,) = _blocks("python")
    (toml,) = _blocks("toml")
    group = re.search(r'\[project\.entry-points\."([^"]+)"\]\n(.*)', toml, flags=re.S)
    name, value = (v.strip().strip('"') for v in group.group(2).splitlines()[0].split("="))
    site.mkdir(parents=True)
    (site / f"{value}.py").write_text(code)
    info = site / "maediff_tinyae-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: maediff-tinyae\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group.group(1)}]\n{name} = {value}\n")


@pytest.mark.slow
def test_the_plugin_example_trains_evaluates_detects_and_benchmarks(tiny_bench, tmp_path):
    site = tmp_path / "site"
    _install(site)
    scans = tmp_path / "scans"
    scans.mkdir()
    first = sorted((tiny_bench / "Test" / "Brats21" / "t2").glob("*.nii.gz"))[0]
    (scans / first.name).symlink_to(first)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), *sys.path]),
        "OMP_NUM_THREADS": "1",
    }
    swaps = {
        "data/synthetic": str(tiny_bench),
        "runs/": f"{tmp_path}/runs/",
        "scans/": f"{scans}/",
        "maps/": f"{tmp_path}/maps/",
        "bench/": f"{tmp_path}/bench/",
        "tinyae-cpu": "tinyae-tiny",
        "--scale cpu --seeds 0 1 2": "--scale tiny --seeds 0 --steps 2 --max-volumes 1",
    }
    (commands,) = _blocks("shell")
    for line in commands.strip().splitlines():
        for a, b in swaps.items():
            line = line.replace(a, b)
        argv = shlex.split(line)[1:] + ["--device", "cpu", "-q"]
        if argv[0] == "evaluate":
            argv += ["--max-volumes", "1"]
        res = subprocess.run(
            [sys.executable, "-m", "maediff", *argv], env=env, capture_output=True, text=True
        )
        assert res.returncode == 0, f"{line}\n{res.stderr[-3000:]}"
    run = tmp_path / "runs" / "tinyae"
    assert (run / "last.safetensors").exists()
    # the run's configuration: the shared sections and the model's own, in its own width
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert list(saved) == [
        "name",
        "model",
        "geometry",
        "tinyae",
        "train",
        "data",
        "inference",
        "augment",
    ]
    assert saved["tinyae"] == {"width": 8}
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["model"] == "Tiny AE" and "Brats21" in summary["datasets"]
    assert (tmp_path / "maps" / f"{first.name.removesuffix('.nii.gz')}_anomaly.nii.gz").exists()
    table = (tmp_path / "bench" / "mine" / "table.md").read_text()
    assert "| Tiny AE | 1 |" in table and "| DAE | 1 |" in table
    # without the package on the path the model is unknown: the registry really came from it
    env.pop("PYTHONPATH")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "maediff",
            "evaluate",
            "--model",
            str(run),
            "--data",
            str(tiny_bench),
            "-o",
            str(tmp_path / "e2"),
            "--device",
            "cpu",
            "-q",
        ],
        env={**env, "PYTHONPATH": os.pathsep.join(p for p in sys.path if "site" != Path(p).name)},
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "tinyae" in res.stderr
