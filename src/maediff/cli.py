"""The `maediff` command: thin argument parsing around one function per subcommand.

Importing this module imports neither torch nor the models: `maediff report` and
`maediff --help` stay light. The parser of a subcommand is built only when that
subcommand runs (`build_parser(command)`), so a subcommand that does not list the
models (report) never loads them.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from ._version import __version__
from .names import ANOMALY_SETS, TUMOUR, protocol_name, shown_name

EPILOG = "Cite: Xu, Wang, Du. MAEDiff: Masked Autoencoder-enhanced Diffusion Models for Unsupervised Anomaly Detection in Brain Images (2024)."
AMP_CHOICES = ["none", "bf16", "fp16", "auto"]


DEFAULT_PRESET = "cpu"
TRAINED_SET_EXAMPLE = "inference.batch_size=16"  # a key every trained model may change


class UsageError(ValueError):
    """Options that cannot go together: reported with the subcommand's usage."""


# ------------------------------------------------------------------ helpers


def _config(args: argparse.Namespace):
    from .config import apply_overrides, get_preset, load_config

    if getattr(args, "config", None):
        cfg = load_config(args.config)
    else:
        cfg = get_preset(getattr(args, "preset", None) or DEFAULT_PRESET)
    overrides = list(getattr(args, "set", None) or [])
    if getattr(args, "fold", None) is not None:
        overrides.append(f"data.fold={args.fold}")
    overrides += _training_overrides(args, overrides)
    return apply_overrides(cfg, overrides) if overrides else cfg


def _training_overrides(args: argparse.Namespace, given: list[str]) -> list[str]:
    """train --steps N (the budget is N steps: train.max_steps, the preset's epoch and
    minute limits lifted, as demo --steps does) and --seed S (train.seed)."""
    out = []
    steps, seed = getattr(args, "train_steps", None), getattr(args, "train_seed", None)
    if steps is not None:
        if steps < 1:
            raise UsageError(f"--steps {steps} must be >= 1")
        out += [f"train.max_steps={steps}", "train.max_minutes=0", "train.epochs=null"]
    if seed is not None:
        out.append(f"train.seed={seed}")
    keys = {o.split("=", 1)[0].strip() for o in given}
    for flag, key in (("--steps", "train.max_steps"), ("--seed", "train.seed")):
        if key in keys and any(o.startswith(key + "=") for o in out):
            raise UsageError(f"give {flag} or --set {key}=..., not both")
    return out


def one_line(e: BaseException) -> str:
    """An exception as one line: its message's lines joined, or its type when empty."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text or type(e).__name__


def _device(name: str):
    from .device import resolve_device

    return resolve_device(name)


def _seed(args: argparse.Namespace, model) -> int:
    return args.seed if args.seed is not None else model.cfg.inference.seed


# ------------------------------------------------------------------ subcommands


def cmd_synth(args: argparse.Namespace) -> int:
    from .data.synthetic import SynthConfig, generate_benchmark

    cfg = SynthConfig(
        seed=args.seed,
        site=args.site,
        healthy_trainval=args.healthy,
        healthy_test=args.healthy_test,
        tumour_val=args.tumour_val,
        tumour_test=args.tumour_test,
        ms_val=args.ms_val,
        ms_test=args.ms_test,
        workers=args.workers,
    )
    t = time.perf_counter()
    out = generate_benchmark(args.output, cfg, overwrite=args.overwrite, progress=not args.quiet)
    print(f"synthetic benchmark written to {out} in {time.perf_counter() - t:.0f} s")
    return 0


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_resume(args: argparse.Namespace, saved) -> None:
    """--resume continues a run with the configuration it was started with: the same
    command again with --resume is fine, options that ask for another one are refused."""
    from dataclasses import replace

    from .config import to_dict

    if not (args.preset or args.config or args.set or args.fold is not None) and (
        args.train_steps is None and args.train_seed is None
    ):
        return
    if args.preset or args.config:
        cfg = _config(args)
    else:  # --set, --fold, --steps, --seed change the run's own configuration
        from .config import apply_overrides

        overrides = list(args.set or [])
        if args.fold is not None:
            overrides.append(f"data.fold={args.fold}")
        overrides += _training_overrides(args, overrides)
        cfg = apply_overrides(saved, overrides)
    if not cfg.data.landmarks:  # learned from the training scans when the run started
        cfg = replace(cfg, data=replace(cfg.data, landmarks=saved.data.landmarks))
    if not cfg.data.trained_on.scans:  # measured on them then (data/qc.py)
        cfg = replace(cfg, data=replace(cfg.data, trained_on=saved.data.trained_on))
    asked, had = _flat(to_dict(cfg)), _flat(to_dict(saved))
    differ = sorted(k for k in asked.keys() | had.keys() if asked.get(k) != had.get(k))
    if differ:
        shown = ", ".join(f"{k} ({had.get(k)!r} -> {asked.get(k)!r})" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise UsageError(
            f"--resume continues {args.run} with the configuration it was started with; the "
            f"options given change {shown}{more} (start a new run, or --overwrite without --resume)"
        )


def cmd_train(args: argparse.Namespace) -> int:
    from .data.bids import parse_participants
    from .outputs import check_outputs
    from .training.data import prepare_training_data
    from .training.trainer import TRAIN_OUTPUTS, load_run_config, read_run_sources, train

    run = Path(args.run)
    _device(args.device)  # an unknown device fails now, not after the data are loaded
    if args.resume:
        cfg = load_run_config(run)
        _check_resume(args, cfg)
        saved = read_run_sources(run)
        data_dir = args.data or saved.get("data_dir")
        train_list = args.train_list or saved.get("train_list")
        val_list = args.val_list or saved.get("val_list")
        participants = parse_participants(args.participants) or saved.get("participants")
    else:
        cfg = _config(args)
        data_dir, train_list, val_list = args.data, args.train_list, args.val_list
        participants = parse_participants(args.participants)
        if (run / "last.safetensors").exists() and not args.overwrite:
            raise ValueError(
                f"{run} already holds a training run; use --resume to continue it or --overwrite to start again"
            )
    # the output rule (outputs.py): a user's config.yaml, log.csv or model card in the
    # run folder is not replaced without --overwrite, an input (--config) never
    check_outputs(
        run,
        "train",
        TRAIN_OUTPUTS,
        args.overwrite,
        inputs=[args.config, train_list, val_list],
        adopt=args.resume,
    )
    data = prepare_training_data(
        cfg, data_dir, train_list, val_list, not args.quiet, participants, args.suffix
    )
    summary = train(cfg, data, run, device=args.device, resume=args.resume, progress=not args.quiet)
    print(
        f"trained {cfg.name} ({cfg.model}) {summary['steps']} steps in {summary['minutes']} min; "
        f"best validation loss {summary['best_val_loss']}; run folder {run}"
    )
    return 0


def _threshold_source(args: argparse.Namespace):
    """detect's threshold options as pipeline/thresholds.py takes them."""
    from .pipeline.thresholds import ThresholdSource

    return ThresholdSource(
        threshold=args.threshold,
        origin=args.threshold_from,
        dataset=args.threshold_dataset,
        fpr=args.fpr,
        model_path=args.model,
    )


def _inference_overrides(args: argparse.Namespace) -> list[str]:
    """--set and --amp for a trained model; load_model refuses the keys its model does
    not declare changeable (models/base.py, AnomalyModel.trained_options)."""
    overrides = list(args.set or [])
    if getattr(args, "amp", None):
        overrides.append(f"inference.amp={args.amp}")
    return overrides


def _suffix(args: argparse.Namespace) -> str:
    """The contrast of the BIDS scans to read: --suffix, else the one the model records
    of its training scans, else T2w."""
    if args.suffix:
        return args.suffix
    from .data.bids import is_bids
    from .training.export import recorded_contrast

    return (recorded_contrast(args.model) if is_bids(args.input) else "") or "T2w"


def cmd_detect(args: argparse.Namespace) -> int:
    from .data.bids import is_bids, parse_participants
    from .data.splits import read_inputs
    from .pipeline.detect import check_output_folder, detect_files
    from .pipeline.thresholds import check_source, detect_threshold, t_test_override
    from .weights import load_model

    if args.threshold is not None and args.threshold_from:
        raise UsageError("give --threshold or --threshold-from, not both")
    if args.fpr is not None and args.threshold is not None:
        raise UsageError("give --threshold or --fpr, not both")
    if args.fpr is not None and not 0 < args.fpr < 1:
        raise ValueError(
            f"--fpr {args.fpr:g} is not a rate: give a fraction in (0, 1), e.g. 0.01 for 1 %"
        )
    check_output_folder(args.input, args.output)
    subjects = read_inputs(args.input, parse_participants(args.participants), suffix=_suffix(args))
    source = _threshold_source(args)
    check_source(source)  # a bad evaluation fails before the model loads
    overrides = _inference_overrides(args)
    overrides += t_test_override(args.threshold_from, args.threshold, args.set or [])
    model = load_model(args.model, _device(args.device), overrides)
    chosen = detect_threshold(source, model)
    threshold, how, cal = chosen.value, chosen.how, chosen.calibration
    if how:
        print(f"threshold {how}")
    for w in cal.warnings if cal else ():
        print(f"warning: {w}", file=sys.stderr)
    report = detect_files(
        subjects,
        args.output,
        model,
        overwrite=args.overwrite,
        threshold=threshold,
        bids=args.bids,
        seed=_seed(args, model),
        batch_size=args.batch_size,
        progress=not args.quiet,
        bids_source=args.input if is_bids(args.input) else None,
        calibration=cal,
        threshold_source=how,
        input_root=args.input,
        strict=args.strict,
        qc=args.qc,
        raw_space=args.raw_space,
    )
    per_volume = report.seconds / max(len(report.written), 1)
    print(
        f"{len(report.written)} written, {len(report.skipped)} skipped (done before with these settings; --overwrite to redo), "
        f"{len(report.failed)} failed, {report.seconds:.0f} s ({per_volume:.1f} s per volume) -> {args.output}"
    )
    for text in report.warnings:  # unusual inputs, scored and flagged in the qc column
        print(f"maediff detect: warning: {text}", file=sys.stderr)
    for path, err in report.failed:
        print(f"  FAILED {path}: {err}", file=sys.stderr)
    return 1 if report.failed else 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .data.bids import parse_participants
    from .data.splits import read_inputs
    from .pipeline.calibrate import calibrate_files, calibration_text, check_calibrate_arguments
    from .weights import load_model

    participants = parse_participants(args.participants)
    subjects = read_inputs(args.input, participants, suffix=_suffix(args))
    source = str(args.input) + (
        " " + " ".join(f"{k}={v}" for k, v in participants.items()) if participants else ""
    )
    inputs = [args.input, *(p for s in subjects for p in (s.image, s.mask, s.seg))]
    check_calibrate_arguments(args.output, args.fpr, args.bootstrap, args.overwrite, inputs)
    model = load_model(args.model, _device(args.device), _inference_overrides(args))
    cal = calibrate_files(
        subjects,
        args.output,
        model,
        fprs=args.fpr,
        seed=_seed(args, model),
        n_boot=args.bootstrap,
        source=source,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        progress=not args.quiet,
        input_lists=[args.input],
    )
    print(calibration_text(cal))  # with its warnings
    print(f"calibration: {Path(args.output) / 'calibration.json'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .training.export import export_model, read_card

    out = export_model(
        args.run, args.output, args.calibration, which=args.which, overwrite=args.overwrite
    )
    print(read_card(out))
    print(f"model file: {out} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .training.export import model_info

    print(model_info(args.model), end="")
    return 0


def _evaluation_model(args: argparse.Namespace):
    """The trained model of --model, or the training-free baseline of --baseline."""
    from dataclasses import replace

    from .models import build_model
    from .weights import load_model

    if args.baseline and args.model:
        raise UsageError("give either --model RUN_OR_CHECKPOINT or --baseline, not both")
    if args.model and (args.preset or args.config):
        flag = "--preset" if args.preset else "--config"
        raise UsageError(
            f"{flag} configures a --baseline; a trained model (--model) carries its own "
            f"configuration (change its inference options with --set inference.KEY=VALUE)"
        )
    if args.baseline:
        cfg = _config(args)  # the preset (default cpu) or config decides the data grid
        return build_model(replace(cfg, model=args.baseline, name=args.baseline))
    if not args.model:
        raise UsageError("give --model RUN_OR_CHECKPOINT, or --baseline thresh")
    model = load_model(args.model, _device(args.device), _inference_overrides(args))
    return model


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .config import display_name
    from .data.bids import is_bids, parse_participants
    from .pipeline.evaluate import evaluate_model, plan_bids_evaluation

    plan = None
    if is_bids(args.data):
        plan = plan_bids_evaluation(
            args.data, parse_participants(args.participants), args.val_fraction, not args.no_ixi
        )
    elif args.participants:
        raise ValueError(
            f"--participants selects subjects of a BIDS data set; {args.data} is not one"
        )
    model = _evaluation_model(args)
    s = evaluate_model(
        model,
        args.data,
        args.output,
        label=args.label
        or display_name(model.cfg) + (" (normative)" if args.scoring == "normative" else ""),
        datasets=[protocol_name(d) for d in args.datasets],
        healthy_test=not args.no_ixi,
        fold=args.fold or 0,
        n_jobs=args.jobs,
        workers=args.workers,
        seed=_seed(args, model),
        max_volumes=args.max_volumes,
        progress=not args.quiet,
        plan=plan,
        t_candidates=args.choose_t or (),
        scoring=args.scoring,
        overwrite=args.overwrite,
    )
    if s.scoring.t_choice:
        from .pipeline.choose_t import TChoice

        print(TChoice.from_json(s.scoring.t_choice).describe())
    print((Path(args.output) / "results.md").read_text())
    free = Path(args.output) / "labelfree.md"
    if free.exists():  # scan-level AUROC and Dice at false-positive-rate thresholds
        print(free.read_text())
    print(f"report: {Path(args.output) / 'report.html'} ({s.seconds:.0f} s)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .outputs import check_outputs, record_outputs
    from .reporting.runs import check_combinable, load_summary, report_files, write_report

    summaries = [load_summary(p) for p in args.evaluations]
    check_combinable(summaries)
    out = Path(args.output)
    if (out / "summary.json").exists():  # an evaluation's tables are its own, even with --overwrite
        raise ValueError(
            f"{out} is an evaluation folder (it holds summary.json): its tables would then "
            "disagree with its summary; write the report to another folder"
        )
    files = report_files(summaries)
    check_outputs(out, "report", files, args.overwrite, inputs=args.evaluations)
    record_outputs(out, "report", files)
    page = write_report(summaries, out)
    print((Path(args.output) / "results.md").read_text())
    print(f"report: {page}")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .data.preprocess import (
        RawOptions,
        check_masks,
        check_preprocess_outputs,
        preprocess_outputs,
        preprocess_scan,
    )
    from .data.splits import read_inputs
    from .outputs import record_outputs

    opts = RawOptions(
        skull_strip=args.skull_strip,
        register=not args.no_register,
        n4=not args.no_n4,
        crop=not args.no_crop,
        template=args.template,
        template_mask=args.template_mask,
        device=args.device,
    )
    failed = []
    subjects = read_inputs(args.input)
    check_masks(subjects, opts)  # once, before any work
    check_preprocess_outputs(subjects, args.output, args.overwrite)
    record_outputs(
        args.output,
        "preprocess",
        [p.name for s in subjects for p in preprocess_outputs(args.output, s.name)],
    )
    for s in tqdm(subjects, desc="preprocessing", unit="scan", disable=args.quiet):
        mask = s.mask if opts.skull_strip == "mask" else None
        try:
            preprocess_scan(s.image, args.output, mask, opts, s.name)
        except (ValueError, RuntimeError) as e:  # DataError included
            failed.append((s.image, e))
    print(f"{len(subjects) - len(failed)} preprocessed, {len(failed)} failed -> {args.output}")
    for path, err in failed:
        print(f"  FAILED {path}: {err}", file=sys.stderr)
    return 1 if failed else 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from .benchmark import BenchmarkPlan, run_benchmark

    plan = BenchmarkPlan.from_args(
        table=args.table,
        models=args.models,
        scale=args.scale,
        folds=args.folds,
        seeds=args.seeds,
        data=args.data,
        minutes=args.minutes,
        steps=args.steps,
        max_volumes=args.max_volumes,
        overrides=args.set or [],
    )
    return run_benchmark(
        plan,
        Path(args.output),
        device=args.device,
        list_runs=args.list,
        estimate=not args.no_estimate,
        run_index=args.run_index,
        collect_only=args.collect,
        progress=not args.quiet,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from .pipeline.demo import run_demo

    run_demo(
        Path(args.output),
        minutes=args.minutes,
        steps=args.steps,
        overrides=args.set,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
        amp=args.amp,
        model=args.model,
    )
    return 0


# ------------------------------------------------------------------ parser


class HelpFormatter(argparse.HelpFormatter):
    """Each option's help with its default said once, and only where there is one: not
    for required options, switches, options whose absence leaves the choice to the
    configuration (default None), or help that already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if (
            not action.option_strings
            or action.required
            or d is None
            or d is False
            or d is argparse.SUPPRESS
            or d == []
            or "default" in text
        ):
            return text
        shown = " ".join(map(str, d)) if isinstance(d, list | tuple) else str(d)
        return f"{text} (default: {shown.replace('%', '%%')})"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):  # commands keep their lines
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)


class CommandParser(argparse.ArgumentParser):
    """The `maediff` parser: an argument that a subcommand does not know is reported
    with that subcommand's usage, not the top level's."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            command_parser(self, getattr(ns, "command", None)).error(
                "unrecognized arguments: " + " ".join(extra)
            )
        return ns


def command_parser(ap: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    """The parser of subcommand `command` of `ap` (`ap` itself when there is none)."""
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return ap


def _add_config_args(
    p: argparse.ArgumentParser, preset_for: str = "", example: str = "train.lr=2e-4"
) -> None:
    from .registry import model_names  # (loads the models and the plug-ins)

    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--preset",
        metavar="PRESET",
        help=f"{preset_for}MODEL (paper scale), MODEL-cpu or MODEL-tiny; MODEL one of "
        f"{', '.join(model_names())}; 'paper' = maediff, 'cpu' = maediff-cpu "
        f"(default: {DEFAULT_PRESET})",
    )
    which.add_argument(
        "--config",
        help="YAML/JSON config file instead of --preset (it may start with 'preset: NAME')",
    )
    _add_set(p, example)


def _add_set(p: argparse.ArgumentParser, example: str = "train.lr=2e-4") -> None:
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. --set {example} (repeatable)",
    )


def _add_runtime_args(p: argparse.ArgumentParser, seed: int | None = 0, amp: bool = False) -> None:
    """--device, --seed, --amp and -q, the same for every command that computes."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 or mps")
    if seed is not False:
        p.add_argument(
            "--seed",
            type=int,
            default=seed,
            help="random seed" + (" (default: the model's inference.seed)" if seed is None else ""),
        )
    if amp:
        p.add_argument("--amp", choices=AMP_CHOICES, help="autocast (default: the config's)")
    _add_quiet(p)


def _add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _parser_synth(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, help="folder to create")
    p.add_argument("--seed", type=int, default=0, help="random seed of every subject")
    p.add_argument(
        "--site",
        choices=["a", "b"],
        default="a",
        help="acquisition: a, or b, a second scanner with other contrast, bias, noise and resolution",
    )
    p.add_argument("--healthy", type=int, default=120, help="healthy train+val volumes (5 folds)")
    p.add_argument("--healthy-test", type=int, default=8, help="healthy test volumes (IXI-like)")
    p.add_argument("--tumour-val", type=int, default=8, help="tumour validation volumes")
    p.add_argument("--tumour-test", type=int, default=16, help="tumour test volumes")
    p.add_argument("--ms-val", type=int, default=8, help="MS-lesion validation volumes")
    p.add_argument("--ms-test", type=int, default=12, help="MS-lesion test volumes")
    p.add_argument("--workers", type=int, default=2, help="processes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    _add_quiet(p)


def _add_participants(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--participants",
        nargs="+",
        metavar="COLUMN=VALUE",
        help="BIDS input: only participants whose participants.tsv row has these values",
    )


def _add_suffix(p: argparse.ArgumentParser, training: bool = False) -> None:
    p.add_argument(
        "--suffix",
        metavar="SUFFIX",
        help="the scans' contrast as a BIDS suffix (T2w, FLAIR, T1w, ...): which scans of a "
        "BIDS data set are read, "
        + (
            "recorded in the model (default: T2w for BIDS and pDDPM's layout; unrecorded "
            "for other scans)"
            if training
            else "default: the contrast the model records, else T2w"
        ),
    )


def _parser_train(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data", help="data folder in pDDPM's layout (Train/ixi, splits/)")
    source.add_argument(
        "--train-list",
        help="instead of --data: a folder of healthy scans, a CSV (image, mask) or a BIDS data "
        "set (its scans without lesion labels)",
    )
    p.add_argument(
        "--val-list",
        help="validation scans for --train-list (BIDS without it: every 10th subject)",
    )
    _add_participants(p)
    _add_suffix(p, training=True)
    p.add_argument(
        "--run-dir",
        "--run",
        dest="run",
        required=True,
        help="run folder (checkpoints, logs, config); under torchrun write --run-dir",
    )
    p.add_argument("--fold", type=int, help="IXI fold 0-4 (data.fold)")
    _add_config_args(p)
    p.add_argument(
        "--steps",
        dest="train_steps",
        type=int,
        metavar="N",
        help="train for N optimizer steps (train.max_steps; the preset's epoch and minute "
        "limits are lifted; default: the preset's budget)",
    )
    p.add_argument(
        "--seed",
        dest="train_seed",
        type=int,
        metavar="SEED",
        help="random seed of the initialisation and the batches (train.seed; default: the "
        "configuration's)",
    )
    resume = p.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume", action="store_true", help="continue the run in --run from its last checkpoint"
    )
    resume.add_argument(
        "--overwrite", action="store_true", help="start again in a run folder that holds a run"
    )
    _add_runtime_args(p, seed=False)


def _add_threshold_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threshold", type=float, help="binarise the score map at this value")
    p.add_argument(
        "--threshold-from",
        metavar="PATH",
        help="take the threshold from an evaluation folder (or its summary.json), or from a "
        "calibration (maediff calibrate's folder, or a model file that carries one) at --fpr",
    )
    _add_fpr(
        p,
        None,
        None,
        "false-positive rate of a calibration on healthy scans (--threshold-from CALIB, "
        "or alone: the model file's own calibration)",
    )
    p.add_argument(
        "--threshold-dataset",
        metavar="NAME",
        default=shown_name(TUMOUR),
        help="which data set's threshold --threshold-from uses",
    )


def _parser_detect(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-i",
        "--input",
        required=True,
        help="a NIfTI file, a folder of them, a CSV (image, mask, seg) or a BIDS data set",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="output folder (for a BIDS input: a derivatives data set, e.g. DS/derivatives/maediff)",
    )
    _add_participants(p)
    _add_suffix(p)
    p.add_argument("--model", required=True, help="run folder or .safetensors checkpoint")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="redo every scan, replacing files of the output names that exist",
    )
    _add_threshold_args(p)
    p.add_argument(
        "--bids",
        action="store_true",
        help="BIDS-derivative names (NAME_desc-anomalymap_T2w.nii.gz)",
    )
    p.add_argument(
        "--raw-space",
        metavar="RAW",
        help="the raw scans (folder, CSV) that maediff preprocess made the input from: "
        "write the maps on their voxel grids, through each scan's NAME_to_raw.tfm",
    )
    p.add_argument(
        "--qc",
        action="store_true",
        help="also draw one picture per scan (NAME_qc.png: input, reconstruction, anomaly "
        "map with its colour bar, prediction over the input; three planes through the "
        "highest-scoring region) and OUT/index.html, the page that shows them",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse (do not map) a scan that the checks against the model's training data "
        "flag; without it the scan is mapped and its flags go to the qc column",
    )
    p.add_argument("--batch-size", type=int, help="inputs per forward pass")
    _add_set(p, TRAINED_SET_EXAMPLE)
    _add_runtime_args(p, seed=None, amp=True)


def _add_fpr(p: argparse.ArgumentParser, nargs: str | None, default, help_text: str) -> None:
    p.add_argument(
        "--fpr", type=float, nargs=nargs, default=default, metavar="RATE", help=help_text
    )


def _parser_calibrate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="run folder or .safetensors model file")
    p.add_argument(
        "-i",
        "--input",
        required=True,
        help="healthy scans: a folder of NIfTI files, a CSV (image, mask) or a BIDS data set",
    )
    p.add_argument("-o", "--output", required=True, help="folder for calibration.json")
    _add_participants(p)
    _add_suffix(p)
    _add_fpr(
        p,
        "+",
        [0.01, 0.05],
        "false-positive rates: a threshold for each, exceeded by this share of healthy brain voxels",
    )
    p.add_argument(
        "--bootstrap", type=int, default=1000, help="resamples of the scans for the interval"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing calibration")
    p.add_argument("--batch-size", type=int, help="inputs per forward pass")
    _add_set(p, TRAINED_SET_EXAMPLE)
    _add_runtime_args(p, seed=None, amp=True)


def _parser_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder (or a model file to export again)")
    p.add_argument(
        "-o", "--output", required=True, help="the file to write, e.g. model.safetensors"
    )
    p.add_argument(
        "--calibration", help="a calibration of this model to include (maediff calibrate's folder)"
    )
    p.add_argument(
        "--which", choices=["best", "last"], default="best", help="which checkpoint of the run"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")


def _parser_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a run folder or .safetensors model file")


def _parser_evaluate(p: argparse.ArgumentParser) -> None:
    from .models import MODELS

    p.add_argument("--model", help="run folder or .safetensors checkpoint")
    p.add_argument(
        "--baseline",
        choices=sorted(n for n, c in MODELS.items() if not c.trainable),
        help="evaluate a model that needs no training (intensity thresholding) instead",
    )
    p.add_argument(
        "--data",
        required=True,
        help="data folder in pDDPM's layout, or a BIDS data set (its scans with lesion labels; "
        "every --val-fraction-th subject chooses the threshold)",
    )
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the results in an -o that holds files"
    )
    p.add_argument(
        "--datasets",
        nargs="+",
        metavar="NAME",
        default=[shown_name(d) for d in ANOMALY_SETS],
        help="the lesion data sets to evaluate (folders of Test/ in pDDPM's layout, spelled in any case)",
    )
    _add_participants(p)
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.25,
        help="BIDS: share of the labelled subjects that choose the threshold",
    )
    p.add_argument("--no-ixi", action="store_true", help="skip the healthy IXI test split (l1)")
    p.add_argument("--fold", type=int, help="IXI fold, recorded in the results (default: 0)")
    p.add_argument("--label", help="model name in tables (default: the preset's row name)")
    p.add_argument(
        "--max-volumes", type=int, help="use only the first N volumes of each split (quick looks)"
    )
    p.add_argument("--jobs", type=int, default=1, help="processes for post-processing and metrics")
    p.add_argument(
        "--scoring",
        choices=("residual", "normative"),
        default="residual",
        help="residual: the paper's |x - x_rec|; normative: the residual against healthy "
        "residuals of the same intensity, fitted on healthy validation volumes "
        "(docs/evaluation.md §3d)",
    )
    p.add_argument(
        "--choose-t",
        type=int,
        nargs="+",
        metavar="T",
        help="diffusion models: choose t_test among these on the validation volumes (never "
        "on test), then evaluate at the chosen t; recorded in summary.json and reused by "
        "detect --threshold-from",
    )
    p.add_argument(
        "--workers",
        type=int,
        help="single-threaded processes that reconstruct the volumes (default: one per torch "
        "thread, at most 4, on the CPU; 0: in this process)",
    )
    _add_config_args(p, preset_for="with --baseline: ", example=TRAINED_SET_EXAMPLE)
    _add_runtime_args(p, seed=None, amp=True)


def _parser_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("evaluations", nargs="+", help="evaluation folders (or their summary.json)")
    p.add_argument(
        "-o", "--output", required=True, help="folder for results.md, results.csv and report.html"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files of these names not written by report",
    )


def _parser_preprocess(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-i", "--input", required=True, help="a raw NIfTI scan, a folder of them, or a CSV"
    )
    p.add_argument(
        "-o", "--output", required=True, help="output folder (NAME.nii.gz + NAME_mask.nii.gz)"
    )
    p.add_argument(
        "--skull-strip",
        choices=["mask", "robex", "hd-bet", "threshold"],
        default="mask",
        help="brain mask: given NAME_mask companions; ROBEX (offline, T1-weighted scans: "
        'pip install "maediff[robex]"); HD-BET (pip install hd-bet, downloads its weights '
        "on first use); or image > 0 (scans already skull-stripped)",
    )
    p.add_argument("--no-register", action="store_true", help="skip affine registration")
    p.add_argument("--no-n4", action="store_true", help="skip N4 bias-field correction")
    p.add_argument("--no-crop", action="store_true", help="skip cropping to the brain")
    p.add_argument("--template", help="template image (default: MNI152 from nilearn)")
    p.add_argument("--template-mask", help="brain mask of --template")
    p.add_argument("--device", default="cpu", help="device for HD-BET")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist")
    _add_quiet(p)


def _parser_benchmark(p: argparse.ArgumentParser) -> None:
    p.add_argument("--table", choices=["1", "2"], help="every model of the paper's Table 1 or 2")
    p.add_argument("--models", nargs="+", metavar="MODEL", help="instead of --table: these models")
    p.add_argument(
        "--scale",
        choices=["paper", "cpu", "tiny"],
        default="cpu",
        help="the presets' scale: the published sizes, 48x48 for a CPU, or the tests' size",
    )
    p.add_argument("--folds", nargs="+", type=int, help="IXI folds (pDDPM's layout)")
    p.add_argument("--seeds", nargs="+", type=int, help="training seeds (any data; default: 0)")
    p.add_argument(
        "--data", help="data in pDDPM's layout (default: OUTPUT/data, synthesised if missing)"
    )
    p.add_argument("--minutes", type=float, help="training budget per run, minutes")
    p.add_argument("--steps", type=int, help="training budget per run, steps")
    p.add_argument("--max-volumes", type=int, help="evaluate on the first N volumes of each split")
    _add_set(p)
    p.add_argument("-o", "--output", required=True, help="benchmark folder (resumable)")
    p.add_argument(
        "--list",
        action="store_true",
        help="print one command per run with its estimated time (measured on this machine "
        "once, cached in OUTPUT/estimates.json) and exit",
    )
    p.add_argument(
        "--no-estimate",
        action="store_true",
        help="with --list: measure nothing (recorded and cached times only)",
    )
    p.add_argument(
        "--run-index",
        type=int,
        nargs="+",
        metavar="N",
        help="do only run(s) N of the list (job arrays: one process per GPU, each with its own "
        "CUDA_VISIBLE_DEVICES or --device cuda:I; LOCAL_RANK, when set, picks cuda:LOCAL_RANK; "
        "not under torchrun)",
    )
    p.add_argument(
        "--collect", action="store_true", help="only write the tables from finished runs"
    )
    _add_runtime_args(p, seed=False)


def _parser_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-o", "--output", default="maediff-demo", help="folder for everything the demo writes"
    )
    p.add_argument(
        "--model",
        choices=("shipped", "train", "both"),
        default="shipped",
        help="which MAEDiff to evaluate: the model that ships with the package (trained "
        "longer on the same synthetic benchmark; no training here), one trained here (the "
        "cpu preset with tiled patches, stride = patch size: a quarter of the evaluation, "
        "the time it frees spent on training) for the budget below, or both side by side",
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument(
        "--steps",
        type=int,
        help="training steps (default: 500 with the cpu preset, the same model on every machine)",
    )
    budget.add_argument(
        "--minutes",
        type=float,
        help="a wall-clock training budget instead of steps (the model then depends on the machine)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a value of the model trained here, e.g. --set diffusion.precondition=true, "
        "or --set geometry.stride=8 for the preset's overlapping patches (repeatable)",
    )
    _add_runtime_args(p, seed=0, amp=True)


COMMANDS = [
    (
        "synth",
        cmd_synth,
        _parser_synth,
        "write the offline synthetic brain benchmark (pDDPM layout)",
        "Generate T2-like synthetic brains from the MNI152 template shipped with nilearn: healthy IXI-like volumes with 5 folds, tumour (BraTS21-like) and MS-lesion (MSLUB-like) sets with exact masks.",
    ),
    (
        "preprocess",
        cmd_preprocess,
        _parser_preprocess,
        "raw scans -> skull-stripped, registered, bias-corrected NIfTI",
        "Skull stripping (given mask, ROBEX, HD-BET or threshold), affine registration to a template, N4 bias-field correction and cropping to the brain; writes NAME.nii.gz and NAME_mask.nii.gz for train/detect, and NAME_to_raw.tfm, the transform back to the raw scan (detect --raw-space).",
    ),
    (
        "train",
        cmd_train,
        _parser_train,
        "train a model on healthy scans",
        "Train any model of the registry (--preset) on healthy scans: pDDPM's layout (IXI fold) or your own list. Multi-GPU: torchrun --nproc_per_node=N -m maediff train --run-dir RUN ... (torchrun takes a bare --run for its own --run-path)",
    ),
    (
        "detect",
        cmd_detect,
        _parser_detect,
        "anomaly maps for NIfTI scans, written in the scans' own space",
        "For each scan: NAME_anomaly (|x - reconstruction|), NAME_score (post-processed), NAME_reconstruction and, with a threshold, NAME_prediction; NIfTI in the input's voxel grid, to overlay in a viewer; one row of scalar scores per scan in OUT/scores.csv (scores.tsv for BIDS output). Brain masks are taken from NAME_mask files next to the scans (else image > 0).",
    ),
    (
        "calibrate",
        cmd_calibrate,
        _parser_calibrate,
        "thresholds at false-positive rates, set on healthy scans",
        "Reconstruct healthy scans as detect does and store, per false-positive rate, the score threshold that this share of their brain voxels exceeds, with a bootstrap interval over scans, the scans used and the model's identity (calibration.json); detect --threshold-from CALIB --fpr RATE uses it.",
    ),
    (
        "export",
        cmd_export,
        _parser_export,
        "a trained model as one file to share",
        "One safetensors file with the weights, configuration, maediff version, training data description, calibration (if any) and model card in its metadata; --model takes it wherever it takes a run folder.",
    ),
    (
        "info",
        cmd_info,
        _parser_info,
        "what a model file is: its hashes, training data, calibration and card",
        "Print a model's identity (the SHA-256 of its weights and configuration, its scoring settings), the record of what it was trained on (contrast, voxel size, brain volume, intensity landmarks: what detect checks each scan against), its calibration and its model card.",
    ),
    (
        "evaluate",
        cmd_evaluate,
        _parser_evaluate,
        "the paper's protocol on a data set in pDDPM's layout or a BIDS data set",
        "Threshold on the pooled unhealthy validation split, Dice/AUPRC/AUROC per test volume, l1 on healthy IXI test volumes; beside them the scan-level AUROC and Dice at thresholds set at false-positive rates on healthy validation volumes; per-subject CSVs, summary.json and report.html.",
    ),
    (
        "report",
        cmd_report,
        _parser_report,
        "one table and page from several evaluations (models, folds, seeds)",
        "Evaluations of the same model on the same data set are combined as mean ± sd (the sample sd, n - 1) over runs.",
    ),
    (
        "benchmark",
        cmd_benchmark,
        _parser_benchmark,
        "Tables 1 and 2 and Figure 3: train and evaluate many models, resumable",
        "Trains and evaluates every (model, fold or seed) in its own folder under OUTPUT with one budget, then writes the paper's tables (Markdown, CSV, HTML), each model's paired difference to the reference with its 95 % interval, and Figure 3. Run it again to resume; --list / --run-index split it over a cluster.",
    ),
    (
        "demo",
        cmd_demo,
        _parser_demo,
        "offline: synthesise, evaluate the shipped model (or one trained here), report",
        "Everything on the synthetic benchmark, no data or network needed: synth -> evaluate the MAEDiff model that ships with the package (--model train: train the cpu preset here first; both: side by side) and the Thresh baseline -> report. The data, and so every map the report shows, are synthetic brains.",
    ),
]


# the end of each subcommand's help: one or two commands to start from (they parse:
# tests/test_cli_help.py)
EXAMPLES = {
    "synth": ["maediff synth -o data/synthetic", "maediff synth -o data/site-b --site b"],
    "preprocess": [
        "maediff preprocess -i raw/ -o prep/ --skull-strip threshold",
        "maediff preprocess -i raw/ -o prep/ --skull-strip hd-bet --device cuda",
    ],
    "train": [
        "maediff train --data data/synthetic --preset cpu --run runs/cpu",
        "maediff train --train-list ds/ --participants group=control --suffix FLAIR --run runs/flair",
    ],
    "detect": [
        "maediff detect -i scans/ -o maps/ --model maediff-cpu",
        "maediff detect -i scans/ -o maps/ --model runs/mine --threshold-from calib/ --fpr 0.01 --qc",
    ],
    "calibrate": [
        "maediff calibrate --model runs/mine -i healthy/ -o calib/ --fpr 0.01 0.05",
    ],
    "export": ["maediff export runs/mine -o mine.safetensors --calibration calib/"],
    "info": ["maediff info mine.safetensors", "maediff info maediff-cpu"],
    "evaluate": [
        "maediff evaluate --model runs/cpu --data data/synthetic -o runs/cpu/eval",
        "maediff evaluate --model runs/bids --data ds/ --participants group=patient -o runs/bids/eval",
    ],
    "report": ["maediff report runs/a/eval runs/b/eval -o report/"],
    "benchmark": [
        "maediff benchmark --table 1 --scale cpu -o bench/",
        "maediff benchmark --table 1 --scale cpu -o bench/ --list",
    ],
    "demo": ["maediff demo", "maediff demo --model both --steps 500"],
}


def examples_text(command: str) -> str | None:
    lines = EXAMPLES.get(command)
    return "examples:\n" + "\n".join(f"  {ln}" for ln in lines) if lines else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `maediff` parser. With `command`, only that subcommand's options are built
    (the others keep their one-line help): what `main` uses, so that a subcommand that
    needs no model (report) does not load the models to list them."""
    ap = CommandParser(
        prog="maediff",
        description="MAEDiff: unsupervised anomaly detection in brain MRI with masked-autoencoder-enhanced patch diffusion, and the paper's baselines.",
        epilog=EPILOG,
    )
    ap.add_argument("--version", action="version", version=f"maediff {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, func, add_args, help_text, description in COMMANDS:
        p = sub.add_parser(
            name,
            help=help_text,
            description=description,
            epilog=examples_text(name),
            formatter_class=HelpFormatter,
        )
        if command is None or command == name:
            add_args(p)
        p.set_defaults(func=func)
    return ap


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in argv: its first word that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """maediff's own warnings as one line on stderr (others as Python writes them)."""
    if category.__module__.startswith("maediff"):
        return f"maediff: warning: {message}\n"
    return _python_warning(message, category, filename, lineno, line)


_python_warning = warnings.formatwarning


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _warning_line  # before the models and plug-ins load
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = build_parser(_command_of(argv) or "")  # no subcommand: the top level's help only
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        command_parser(ap, args.command).error(one_line(e))  # exits 2 with the usage
        raise  # (not reached)
    except (ValueError, OSError, FloatingPointError) as e:  # DataError, CheckpointError
        print(f"maediff {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"maediff {args.command}: error: out of memory", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
