"""Put a trained `cpu` run into the package as the demo's shipped model
(src/maediff/pretrained/maediff-cpu.safetensors, through `maediff export`) and write its
human-readable card (maediff-cpu.md) beside it: what it was trained on, with which
switches, for how many steps and how long, on which CPU, and the commands that
reproduce it.

    python benchmarks/ship_demo_model.py RUN --data-dir data/synthetic --cpu "..." \\
        --data-command "maediff synth -o data/synthetic" \\
        --train-command "maediff train --preset cpu --data data/synthetic --run RUN ..."

The numbers the card states are the run's own records (train_summary.json, run.json,
config.yaml); what the demo measures with it is computed live by `maediff demo`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from maediff.config import describe, get_preset
from maediff.training.export import export_model
from maediff.weights import read_checkpoint

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "maediff" / "pretrained"
LIMIT_MB = 10.0


def departures(cfg) -> list[str]:
    """`section.key=value` for every training or model value that differs from the
    `cpu` preset (the step budget and seed aside)."""
    preset = dict(get_preset("cpu").sections)
    out = []
    for name, section in cfg.sections:
        ref = preset.get(name)
        for key, value in vars(section).items():
            if ref is not None and getattr(ref, key) != value:
                out.append(f"{name}.{key}={value}")
    ignore = ("max_steps", "seed", "epochs", "max_minutes")
    for key, value in vars(cfg.train).items():
        if key not in ignore and getattr(get_preset("cpu").train, key) != value:
            out.append(f"train.{key}={value}")
    return out


def card(
    run: Path, data_command: str, train_command: str, cpu: str, t_choice: dict | None = None
) -> str:
    cfg, tensors, extra = read_checkpoint(run)
    if t_choice is not None:
        cfg = replace(cfg, diffusion=replace(cfg.diffusion, t_test=t_choice["chosen"]))
    summary = json.loads((run / "train_summary.json").read_text())
    size = sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6
    changed = departures(cfg)
    lines = [
        "# maediff-cpu: the demo's shipped MAEDiff model",
        "",
        "The `cpu` preset of MAEDiff (the paper's structure at 48x48 with narrow networks:",
        "docs/method.md), trained on the healthy training volumes (IXI fold 0) of the",
        "synthetic benchmark that `maediff synth` generates with seed 0, the one `maediff",
        "demo` generates. `maediff demo` evaluates it live on that benchmark's test volumes.",
        "",
        f"- configuration: {describe(cfg)}",
        f"- departures from the `cpu` preset: {', '.join(changed) or 'none'}",
        f"- training: {summary['steps']} steps of {cfg.train.batch_size} slices, "
        f"{summary['minutes']} min on {cpu}; best validation loss {summary['best_val_loss']:.4f}",
        f"- weights: {summary.get('parameters', '?'):,} parameters, {size:.1f} MB "
        "(the EMA weights at the lowest validation loss)",
        *([t_choice_line(t_choice)] if t_choice else []),
        "",
        "Reproduce it:",
        "",
        "```bash",
        data_command,
        train_command,
        *([t_choice["command"]] if t_choice else []),
        "```",
        "",
        "Intended use: seeing the method work on a laptop, and research on unsupervised",
        "anomaly detection. It has seen synthetic brains only. Not for clinical use.",
        "",
    ]
    return "\n".join(lines)


def t_choice_line(t_choice: dict) -> str:
    dice = ", ".join(
        f"{t}: {100 * sum(v.values()) / len(v):.2f}" for t, v in t_choice["val_dice"].items()
    )
    return (
        f"- noise level: t_test = {t_choice['chosen']} (the preset's {t_choice['configured']}), "
        f"chosen on the validation volumes only by `evaluate --choose-t` "
        f"({t_choice['rule']}, %: {dice})"
    )


def set_t_test(path: Path, t: int) -> None:
    """The shipped file's configuration with t_test = t (its card says where t came from)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["config"])
    old = config["diffusion"]["t_test"]
    config["diffusion"]["t_test"] = t
    meta["config"] = json.dumps(config)
    meta["model_card"] = meta["model_card"].replace(f"t_test={old}", f"t_test={t}")
    save_file(tensors, str(path), metadata=meta)


def _replace_in_metadata(path: Path, old: str, new: str) -> None:
    """The training machine's data path out of the shipped file's metadata (its
    description of the training data names the folder it was read from)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = {k: v.replace(old, new) for k, v in (f.metadata() or {}).items()}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata=meta)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("run", type=Path, help="the trained run folder")
    ap.add_argument("--data-command", required=True, help="the command that made its data")
    ap.add_argument("--train-command", required=True, help="the command that trained it")
    ap.add_argument("--cpu", required=True, help="the CPU it was trained on, in words")
    ap.add_argument(
        "--data-dir", required=True, type=Path, help="the data folder it was trained on"
    )
    ap.add_argument(
        "--t-choice",
        type=Path,
        metavar="SUMMARY",
        help="summary.json of `maediff evaluate --choose-t` on this model: ship its chosen t_test",
    )
    ap.add_argument("--t-choice-command", default="", help="the evaluate command that chose t")
    args = ap.parse_args()
    target = PACKAGE / "maediff-cpu.safetensors"
    export_model(args.run, target, overwrite=True)
    _replace_in_metadata(target, str(args.data_dir), "data/synthetic")
    t_choice = None
    if args.t_choice:
        t_choice = json.loads(args.t_choice.read_text())["scoring"]["t_choice"]
        t_choice["command"] = args.t_choice_command
        set_t_test(target, t_choice["chosen"])
    target.chmod(0o644)  # package data: readable by everyone
    mb = target.stat().st_size / 1e6
    if mb > LIMIT_MB:
        target.unlink()
        raise SystemExit(f"{target} would be {mb:.1f} MB, over the package's {LIMIT_MB} MB")
    text = card(args.run, args.data_command, args.train_command, args.cpu, t_choice)
    (PACKAGE / "maediff-cpu.md").write_text(text)
    print(text)
    print(f"wrote {target} ({mb:.1f} MB)")


if __name__ == "__main__":
    main()
