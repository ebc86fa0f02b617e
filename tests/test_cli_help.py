"""The command line as a new user meets it: every option of every subcommand has help,
defaults are said once and only where they exist, errors come with the subcommand's
usage, conflicting options are refused, mistyped --set keys get a near match, and
`maediff report` runs without torch. All of it read from the parser itself, so a new
subcommand or option is checked without editing a list."""

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from maediff import cli
from maediff.cli import HelpFormatter, _check_resume, _config, build_parser, main
from maediff.config import apply_overrides, get_preset, save_config
from maediff.names import TUMOUR, protocol_name, shown_name
from maediff.reporting.tables import dataset_columns
from maediff.training.trainer import load_run_config
from maediff.weights import check_trained_overrides


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


SUBCOMMANDS = sorted(_subcommands())


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_option_has_help_and_its_default_once(command, capsys):
    text = _help([command], capsys)
    assert f"usage: maediff {command}" in text
    assert "default: None" not in text and "(default: [])" not in text
    parser = _subcommands()[command]
    fmt = HelpFormatter(f"maediff {command}")
    for action in parser._actions:
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"maediff {command} {name} has no help"
        shown = fmt._get_help_string(action)
        assert shown.count("default") <= 1, f"maediff {command} {name}: {shown!r}"
        if action.required or action.default is None or action.default is False:
            assert shown == action.help, (command, name)  # no default to show: none appended


def test_the_top_level_help_lists_every_subcommand(capsys):
    text = _help([], capsys)
    assert all(c in text for c in SUBCOMMANDS)


def test_help_and_version_import_no_torch():
    code = (
        "import sys\n"
        "from maediff.cli import main\n"
        "for argv in (['--help'], ['--version'], ['report', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (argv, e.code)\n"
        "assert 'torch' not in sys.modules and 'maediff.models' not in sys.modules\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "usage: maediff report" in res.stdout and "maediff 0." in res.stdout


def test_an_unknown_option_prints_the_subcommands_usage(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--run", str(tmp_path / "r"), "--stepz", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: maediff train" in err and "unrecognized arguments: --stepz 3" in err


def test_train_steps_and_seed_set_the_training_config(tmp_path):
    args = build_parser("train").parse_args(
        ["train", "--run", str(tmp_path), "--preset", "tiny", "--steps", "7", "--seed", "3"]
    )
    cfg = _config(args)
    assert cfg.train.max_steps == 7 and cfg.train.seed == 3
    assert cfg.train.max_minutes == 0 and cfg.train.epochs is None  # the step budget alone stops it
    assert _config(build_parser("train").parse_args(["train", "--run", "r"])).train.max_steps > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "5", "--set", "train.max_steps=9"], "give --steps or --set train.max_steps"),
        (["--preset", "tiny", "--config", "c.yaml"], "not allowed with argument --preset"),
        (["--data", "d", "--train-list", "l"], "not allowed with argument --data"),
    ],
)
def test_train_refuses_conflicting_options_with_its_usage(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--run", str(tmp_path / "r"), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: maediff train" in err and message in err


def test_resume_takes_the_same_command_and_refuses_another_configuration(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    start = ["--preset", "tiny", "--set", "train.lr=2e-4", "--steps", "5"]
    cfg = _config(build_parser("train").parse_args(["train", "--run", str(run), *start]))
    learned = replace(cfg.data, landmarks=tuple(float(i) for i in range(11)))  # as training does
    save_config(replace(cfg, data=learned), run / "config.yaml")
    same = build_parser("train").parse_args(["train", "--run", str(run), *start, "--resume"])
    _check_resume(same, load_run_config(run))  # the same command again with --resume
    for other, changed in (
        (
            ["--preset", "tiny", "--set", "train.lr=1e-3", "--steps", "5"],
            "train.lr (0.0002 -> 0.001)",
        ),
        (
            ["--preset", "tiny", "--set", "train.lr=2e-4", "--steps", "9"],
            "train.max_steps (5 -> 9)",
        ),
        (["--preset", "cpu"], "and"),
    ):
        with pytest.raises(SystemExit) as e:
            main(["train", "--run", str(run), "--resume", "--device", "cpu", *other])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "usage: maediff train" in err and "the options given change" in err, err
        assert changed in err, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["evaluate", "--model", "RUN", "--preset", "paper"], "--preset configures a --baseline"),
        (["evaluate", "--model", "RUN", "--config", "c.yaml"], "--config configures a --baseline"),
        (["evaluate", "--model", "RUN", "--baseline", "thresh"], "not both"),
    ],
)
def test_evaluate_refuses_a_preset_for_a_trained_model(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--data", str(tmp_path), "-o", str(tmp_path / "e")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: maediff evaluate" in err and message in err
    assert not (tmp_path / "e").exists()


def test_detect_refuses_two_thresholds(tmp_path, capsys):
    argv = ["detect", "-i", str(tmp_path), "-o", str(tmp_path / "m"), "--model", "RUN"]
    with pytest.raises(SystemExit):
        main([*argv, "--threshold", "0.2", "--threshold-from", str(tmp_path)])
    assert "give --threshold or --threshold-from, not both" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, near",
    [
        ("train.maxsteps=2", "did you mean train.max_steps?"),
        ("trian.lr=1e-3", "did you mean train.lr?"),
        ("inference.compil=on", "did you mean inference.compile?"),
    ],
)
def test_an_unknown_set_key_names_the_near_match(override, near, tmp_path, capsys):
    argv = ["train", "--run", str(tmp_path / "r"), "--preset", "tiny", "--set", override]
    assert main(argv) == 2
    assert near in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_set_takes_on_and_off_for_a_string_option():
    # YAML 1.1 reads on/off as booleans; the option is a string with on/off among its values
    cfg = apply_overrides(
        get_preset("tiny"), ["inference.compile=on", "inference.channels_last=off"]
    )
    assert (cfg.inference.compile, cfg.inference.channels_last) == ("on", "off")
    with pytest.raises(ValueError, match="must be true or false"):  # a bool option stays strict
        apply_overrides(get_preset("tiny"), ["inference.clamp=maybe"])


def test_a_config_file_takes_on_and_off_for_a_string_option(tmp_path):
    from maediff.config import load_config

    path = tmp_path / "fast.yaml"
    path.write_text("preset: tiny\ninference:\n  compile: on\n  channels_last: off\n")
    cfg = load_config(path)
    assert (cfg.inference.compile, cfg.inference.channels_last) == ("on", "off")
    path.write_text("preset: tiny\ninference:\n  clamp: maybe\n")
    with pytest.raises(ValueError, match="must be true or false"):
        load_config(path)


def test_a_trained_model_changes_only_what_its_class_declares():
    check_trained_overrides("maediff", ["inference.batch_size=4", "diffusion.t_test=300"])
    check_trained_overrides("dae", ["data.standardise=nyul"])
    with pytest.raises(ValueError, match="for a trained dae model"):
        check_trained_overrides("dae", ["diffusion.t_test=300"])  # a DAE has no diffusion
    with pytest.raises(ValueError, match="diffusion.t_test, diffusion.sample_steps"):
        check_trained_overrides("maediff", ["unet.model_channels=8"])
    source = Path(cli.__file__).read_text()
    assert "diffusion.sample_steps" not in source and "diffusion.t_test" not in source


def test_one_spelling_per_data_set(capsys):
    assert shown_name(TUMOUR) == "BraTS21" and protocol_name("BraTS21") == TUMOUR
    assert protocol_name("mslub") == "MSLUB" and protocol_name("my-bids-set") == "my-bids-set"
    headers = [c.header for c in dataset_columns([TUMOUR, "MSLUB"], ["IXI"])]
    assert headers[0] == "BraTS21 Dice (%)" and not any("Brats21" in h for h in headers)
    text = _help(["evaluate"], capsys)
    assert "BraTS21" in text and "Brats21" not in text


def test_report_runs_without_torch(tmp_path):
    ev = tmp_path / "eval"
    ev.mkdir()
    summary = {
        "model": "MAEDiff",
        "data_dir": "synthetic",
        "fold": 0,
        "datasets": {TUMOUR: {"metrics": {"dice": {"mean": 0.4, "std": 0.0, "n": 5}}}},
    }
    (ev / "summary.json").write_text(json.dumps(summary))
    code = (
        "import sys\n"
        "from maediff.cli import main\n"
        f"assert main(['report', {str(ev)!r}, '-o', {str(tmp_path / 'rep')!r}]) == 0\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', "
        "'maediff.models', 'maediff.training')))\n"
        "assert not bad, bad[:10]\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "| MAEDiff | 40.00 |" in res.stdout and "BraTS21 Dice (%)" in res.stdout
