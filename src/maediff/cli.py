"""The `maediff` command: thin argument parsing around one function per subcommand."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import __version__
from .checkpoint import CheckpointError
from .data.io import DataError

EPILOG = "Cite: Xu, Wang, Du. MAEDiff: Masked Autoencoder-enhanced Diffusion Models for Unsupervised Anomaly Detection in Brain Images (2024)."


# ------------------------------------------------------------------ helpers


def _config(args: argparse.Namespace):
    from .config import apply_overrides, get_preset, load_config

    cfg = load_config(args.config) if getattr(args, "config", None) else get_preset(args.preset)
    overrides = list(getattr(args, "set", None) or [])
    if getattr(args, "fold", None) is not None:
        overrides.append(f"data.fold={args.fold}")
    return apply_overrides(cfg, overrides) if overrides else cfg


def _device(name: str):
    from .train import resolve_device

    return resolve_device(name)


# ------------------------------------------------------------------ subcommands


def cmd_synth(args: argparse.Namespace) -> int:
    from .data.synthetic import SynthConfig, generate_benchmark

    cfg = SynthConfig(
        args.seed,
        args.healthy,
        args.healthy_test,
        args.tumour_val,
        args.tumour_test,
        args.ms_val,
        args.ms_test,
        args.workers,
    )
    t = time.perf_counter()
    out = generate_benchmark(args.output, cfg, overwrite=args.overwrite, progress=not args.quiet)
    print(f"synthetic benchmark written to {out} in {time.perf_counter() - t:.0f} s")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .train import load_run_config, prepare_training_data, train

    run = Path(args.run)
    if args.resume:
        cfg = load_run_config(run)
        saved = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
        data_dir = args.data or saved.get("data_dir")
        train_list = args.train_list or saved.get("train_list")
        val_list = args.val_list or saved.get("val_list")
    else:
        cfg = _config(args)
        data_dir, train_list, val_list = args.data, args.train_list, args.val_list
        if (run / "last.safetensors").exists() and not args.overwrite:
            raise ValueError(
                f"{run} already holds a training run; use --resume to continue it or --overwrite to start again"
            )
        run.mkdir(parents=True, exist_ok=True)
        (run / "run.json").write_text(
            json.dumps(
                {
                    "data_dir": str(data_dir) if data_dir else None,
                    "train_list": str(train_list) if train_list else None,
                    "val_list": str(val_list) if val_list else None,
                    "version": __version__,
                },
                indent=2,
            )
        )
    data = prepare_training_data(cfg, data_dir, train_list, val_list, progress=not args.quiet)
    summary = train(cfg, data, run, device=args.device, resume=args.resume, progress=not args.quiet)
    print(
        f"trained {summary['steps']} steps in {summary['minutes']} min; best validation loss {summary['best_val_loss']}; run folder {run}"
    )
    return 0


def _threshold(args: argparse.Namespace) -> float | None:
    if args.threshold is not None:
        return args.threshold
    if args.threshold_from:
        from .evaluate import load_summary

        s = load_summary(args.threshold_from)
        ds = args.threshold_dataset
        if ds not in s["datasets"] or "threshold" not in s["datasets"][ds]:
            raise ValueError(f"{args.threshold_from} has no threshold for data set {ds!r}")
        return float(s["datasets"][ds]["threshold"])
    return None


def _inference_overrides(model, args: argparse.Namespace) -> None:
    """--amp and --set inference.* / diffusion.t_test on a trained model."""
    from .config import apply_overrides

    overrides = list(args.set or [])
    bad = [
        o
        for o in overrides
        if not (o.startswith("inference.") or o.startswith("diffusion.t_test="))
    ]
    if bad:
        raise ValueError(
            f"only inference.* and diffusion.t_test can be changed for a trained model, not {bad}"
        )
    if getattr(args, "amp", None):
        overrides.append(f"inference.amp={args.amp}")
    if overrides:
        model.cfg = apply_overrides(model.cfg, overrides)


def cmd_detect(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .data.splits import read_inputs
    from .detect import detect_files

    subjects = read_inputs(args.input)
    model = load_model(args.model, _device(args.device))
    report = detect_files(
        subjects,
        args.output,
        model,
        args.overwrite,
        _threshold(args),
        args.bids,
        args.seed,
        args.batch_size,
        args.amp,
        not args.quiet,
    )
    print(
        f"{len(report.written)} written, {len(report.skipped)} skipped (outputs exist; --overwrite to redo), {len(report.failed)} failed, {report.seconds:.0f} s -> {args.output}"
    )
    for path, err in report.failed:
        print(f"  FAILED {path}: {err}", file=sys.stderr)
    return 1 if report.failed else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .evaluate import evaluate_model

    if args.baseline == "thresh":
        model, label = None, args.label or "Thresh"
        data_cfg = _config(args).data  # the preset (default cpu) or config decides the grid
    elif args.model:
        model = load_model(args.model, _device(args.device))
        label, data_cfg = args.label or "MAEDiff", None
        _inference_overrides(model, args)
    else:
        raise ValueError("give --model RUN_OR_CHECKPOINT, or --baseline thresh")
    s = evaluate_model(
        model,
        args.data,
        args.output,
        label,
        args.datasets,
        not args.no_ixi,
        args.fold or 0,
        data_cfg,
        n_jobs=args.jobs,
        seed=args.seed,
        max_volumes=args.max_volumes,
        progress=not args.quiet,
    )
    print((Path(args.output) / "results.md").read_text())
    print(f"report: {Path(args.output) / 'report.html'} ({s['seconds']:.0f} s)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .evaluate import load_summary, write_report

    page = write_report([load_summary(p) for p in args.evaluations], args.output)
    print((Path(args.output) / "results.md").read_text())
    print(f"report: {page}")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .data.raw import RawOptions, preprocess_scan
    from .data.splits import read_inputs

    opts = RawOptions(
        args.skull_strip,
        not args.no_register,
        not args.no_n4,
        not args.no_crop,
        args.template,
        args.template_mask,
        args.device,
    )
    failed = []
    subjects = read_inputs(args.input)
    for s in tqdm(subjects, desc="preprocessing", unit="scan", disable=args.quiet):
        try:
            preprocess_scan(
                s.image, args.output, s.mask if opts.skull_strip == "mask" else None, opts, s.name
            )
        except (DataError, ValueError, RuntimeError) as e:
            failed.append((s.image, e))
    print(f"{len(subjects) - len(failed)} preprocessed, {len(failed)} failed -> {args.output}")
    for path, err in failed:
        print(f"  FAILED {path}: {err}", file=sys.stderr)
    return 1 if failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(
        Path(args.output),
        minutes=args.minutes,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
        amp=args.amp,
    )
    return 0


# ------------------------------------------------------------------ parser


def _add_config_args(p: argparse.ArgumentParser) -> None:
    from .config import PRESETS

    p.add_argument(
        "--preset",
        default="cpu",
        choices=sorted(PRESETS),
        help="configuration preset (default: cpu; the paper's is 'paper')",
    )
    p.add_argument(
        "--config", help="YAML/JSON config file (overrides --preset; may start with 'preset: NAME')"
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=2e-4 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="maediff",
        description="MAEDiff: unsupervised anomaly detection in brain MRI with masked-autoencoder-enhanced patch diffusion.",
        epilog=EPILOG,
    )
    ap.add_argument("--version", action="version", version=f"maediff {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = sub.add_parser(
        "synth",
        help="write the offline synthetic brain benchmark (pDDPM layout)",
        formatter_class=fmt,
        description="Generate T2-like synthetic brains from the MNI152 template shipped with nilearn: healthy IXI-like volumes with 5 folds, tumour (BraTS21-like) and MS-lesion (MSLUB-like) sets with exact masks.",
    )
    p.add_argument("-o", "--output", required=True, help="folder to create")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--healthy", type=int, default=120, help="healthy train+val volumes (5 folds)")
    p.add_argument("--healthy-test", type=int, default=8)
    p.add_argument("--tumour-val", type=int, default=8)
    p.add_argument("--tumour-test", type=int, default=16)
    p.add_argument("--ms-val", type=int, default=8)
    p.add_argument("--ms-test", type=int, default=12)
    p.add_argument("--workers", type=int, default=2, help="processes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "train",
        help="train on healthy scans",
        formatter_class=fmt,
        description="Train MAEDiff on healthy scans: pDDPM's layout (IXI fold) or your own list. Multi-GPU: torchrun --nproc_per_node=N -m maediff train --run-dir RUN ... (torchrun takes a bare --run for its own --run-path)",
    )
    p.add_argument("--data", help="data folder in pDDPM's layout (Train/ixi, splits/)")
    p.add_argument(
        "--train-list", help="instead of --data: a folder of healthy scans or a CSV (image, mask)"
    )
    p.add_argument("--val-list", help="validation scans for --train-list")
    p.add_argument(
        "--run-dir",
        "--run",
        dest="run",
        required=True,
        help="run folder (checkpoints, logs, config); under torchrun write --run-dir",
    )
    p.add_argument("--fold", type=int, help="IXI fold 0-4 (data.fold)")
    _add_config_args(p)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 or mps")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --run from its last checkpoint"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="start again in a run folder that holds a run"
    )
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "detect",
        help="anomaly maps for NIfTI scans, written in the scans' own space",
        formatter_class=fmt,
        description="For each scan: NAME_anomaly (|x - reconstruction|), NAME_score (post-processed), NAME_reconstruction and, with a threshold, NAME_prediction; NIfTI in the input's voxel grid, to overlay in a viewer. Brain masks are taken from NAME_mask files next to the scans (else image > 0).",
    )
    p.add_argument(
        "-i",
        "--input",
        required=True,
        help="a NIfTI file, a folder of them, or a CSV (image, mask, seg)",
    )
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--model", required=True, help="run folder or .safetensors checkpoint")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true", help="redo scans whose outputs exist")
    p.add_argument("--threshold", type=float, help="binarise the score map at this value")
    p.add_argument(
        "--threshold-from", help="evaluation folder or summary.json to take the threshold from"
    )
    p.add_argument(
        "--threshold-dataset",
        default="Brats21",
        help="which data set's threshold --threshold-from uses",
    )
    p.add_argument(
        "--bids",
        action="store_true",
        help="BIDS-derivative names (NAME_desc-anomalymap_T2w.nii.gz)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--batch-size", type=int, help="(slice, patch) pairs per forward pass")
    p.add_argument("--amp", choices=["none", "bf16", "fp16", "auto"], help="autocast for inference")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser(
        "evaluate",
        help="the paper's protocol on a data set in pDDPM's layout",
        formatter_class=fmt,
        description="Threshold on the pooled unhealthy validation split, Dice/AUPRC/AUROC per test volume, l1 on healthy IXI test volumes; per-subject CSVs, summary.json and report.html.",
    )
    p.add_argument("--model", help="run folder or .safetensors checkpoint")
    p.add_argument(
        "--baseline", choices=["thresh"], help="evaluate intensity thresholding instead of a model"
    )
    p.add_argument("--data", required=True, help="data folder in pDDPM's layout")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--datasets", nargs="+", default=["Brats21", "MSLUB"])
    p.add_argument("--no-ixi", action="store_true", help="skip the healthy IXI test split (l1)")
    p.add_argument("--fold", type=int, help="recorded in the results")
    p.add_argument("--label", help="model name in tables (default MAEDiff / Thresh)")
    p.add_argument(
        "--max-volumes", type=int, help="use only the first N volumes of each split (quick looks)"
    )
    p.add_argument("--jobs", type=int, default=1, help="processes for post-processing and metrics")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=["none", "bf16", "fp16", "auto"])
    p.add_argument("--seed", type=int, default=0)
    _add_config_args(p)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "report",
        help="one table and page from several evaluations (models, folds, seeds)",
        formatter_class=fmt,
        description="Evaluations with the same label are combined as mean ± std over runs.",
    )
    p.add_argument("evaluations", nargs="+", help="evaluation folders (or their summary.json)")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "demo",
        help="offline: synthesise, train the cpu preset, evaluate, report",
        formatter_class=fmt,
        description="Everything on the synthetic benchmark, no data or network needed: synth -> train (cpu preset) -> evaluate MAEDiff and the Thresh baseline -> report.",
    )
    p.add_argument("-o", "--output", default="maediff-demo")
    p.add_argument(
        "--minutes", type=float, default=None, help="training budget (default: the cpu preset's)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--amp",
        choices=["none", "bf16", "fp16", "auto"],
        default=None,
        help="autocast for training and inference (default: the preset's)",
    )
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"maediff {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
