"""The training data: which subjects train and validate, their volumes loaded and
standardised (`prepare_training_data`), and the batches of one epoch.

    data = prepare_training_data(cfg, data_dir="DATA")        # pDDPM layout, IXI fold
    for batch in epoch_batches(data.train, model, cfg, generator, per_rank=32, ddp=ddp): ...

An epoch is pDDPM's: train.slices_per_volume random axial slices per training volume
(or every slice with data.all_slices), shuffled; models that see whole volumes get
every training volume once. Under torchrun each rank takes its share (distributed.py).
The trainer (training/trainer.py) draws from here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..config import Config, TrainingRecord
from ..data.bids import is_bids, read_bids, split_every
from ..data.datasets import SliceSet, load_volumes
from ..data.io import DataError, Subject
from ..data.load import learn_landmarks, nyul_standardise
from ..data.qc import measure_subject, training_record
from ..data.splits import read_inputs, read_pddpm_split
from ..models import AnomalyModel
from ..names import HEALTHY
from .distributed import Distributed, shard


@dataclass
class TrainingData:
    train: SliceSet
    val: SliceSet | None
    description: str
    sources: dict[str, str | None] = field(default_factory=dict)  # written to run.json
    landmarks: tuple[float, ...] = ()  # histogram landmarks of the training volumes
    record: TrainingRecord = TrainingRecord()  # what the model is trained on (data/qc.py)


def _refuse_labelled(subjects: list[Subject], source) -> None:
    """A scan with a lesion label (NAME_seg beside it, a seg column) is no healthy scan:
    the model would learn its lesion as normal."""
    labelled = [s for s in subjects if s.seg is not None]
    if labelled:
        raise DataError(
            f"{source}: {len(labelled)} scan(s) have lesion labels ({labelled[0].seg}"
            f"{', ...' if len(labelled) > 1 else ''}); train on healthy scans only"
        )


def training_subjects(
    cfg: Config,
    data_dir: str | Path | None = None,
    train_list: str | Path | None = None,
    val_list: str | Path | None = None,
    participants: dict[str, str] | None = None,
    suffix: str = "T2w",
) -> tuple[list[Subject], list[Subject], str]:
    """Subjects from pDDPM's layout (IXI fold cfg.data.fold), from explicit lists, or
    from a BIDS data set (its scans without lesion labels among `participants`; without
    a validation list every 10th subject validates); every listed file is checked before
    anything is loaded."""
    if train_list is not None:
        if is_bids(train_list):  # healthy scans (no lesion labels) of the chosen participants
            train = read_bids(train_list, participants, lesions=False, suffix=suffix)
            if val_list is None:
                train, val = split_every(train, 0.1)
                return (
                    train,
                    val,
                    f"BIDS {train_list} ({len(train)} volumes), validation every 10th subject ({len(val)})",
                )
        else:
            train = read_inputs(train_list, participants, suffix=suffix)
        val = (
            read_inputs(
                val_list,
                participants,
                lesions=False if is_bids(val_list) else None,
                suffix=suffix,
            )
            if val_list is not None
            else []
        )
        for subjects, given in ((train, train_list), (val, val_list)):
            _refuse_labelled(subjects, given)
        return (
            train,
            val,
            f"{train_list} ({len(train)} volumes), validation {val_list or 'none'} ({len(val)})",
        )
    if data_dir is None:
        raise ValueError("give a data folder in pDDPM's layout or a list of training scans")
    fold = cfg.data.fold
    train = read_pddpm_split(data_dir, HEALTHY, "train", fold)
    val = read_pddpm_split(data_dir, HEALTHY, "val", fold)
    return train, val, f"{data_dir}: IXI fold {fold} ({len(train)} train / {len(val)} val volumes)"


def prepare_training_data(
    cfg: Config,
    data_dir=None,
    train_list=None,
    val_list=None,
    progress: bool = True,
    participants: dict[str, str] | None = None,
    contrast: str | None = None,
) -> TrainingData:
    """Load the training (and validation) volumes. The histogram landmarks are learned
    from the training volumes (or taken from data.landmarks when set); with
    data.standardise="nyul" every volume is then standardised onto them. The training
    scans are measured for the model's record of them (data/qc.py): `contrast` is their
    BIDS suffix (None: T2w for a BIDS data set and pDDPM's layout, whose IXI scans are
    T2-weighted; unrecorded for other scans)."""
    suffix = contrast or "T2w"
    train_s, val_s, desc = training_subjects(
        cfg, data_dir, train_list, val_list, participants, suffix
    )
    if contrast is None and train_list is not None and not is_bids(train_list):
        contrast = ""  # a folder or list of scans: the contrast is not known
    synthetic = synthetic_origin(data_dir if train_list is None else None)
    if synthetic:
        desc = f"{desc}; {synthetic}"
    size, frac = cfg.geometry.image_size, cfg.data.min_brain_fraction
    raw = replace(cfg.data, standardise="none")
    train_v = load_volumes(train_s, raw, "loading train", progress)
    val_v = load_volumes(val_s, raw, "loading val", progress) if val_s else []
    landmarks = cfg.data.landmarks or learn_landmarks(train_v)
    record = cfg.data.trained_on
    if not record.scans:  # measured before the standardisation, as detect measures a scan
        measures = [measure_subject(s, v) for s, v in zip(train_s, train_v)]
        record = training_record(measures, suffix if contrast is None else contrast, source=desc)
        record = replace(record, synthetic=bool(synthetic))
    if cfg.data.standardise == "nyul":
        for v in (*train_v, *val_v):
            v.image = nyul_standardise(v.image, v.brain_mask, landmarks)
    train = SliceSet(train_v, size, frac)
    val = SliceSet(val_v, size, frac) if val_v else None
    sources = {
        "data_dir": str(data_dir) if data_dir else None,
        "train_list": str(train_list) if train_list else None,
        "val_list": str(val_list) if val_list else None,
        "participants": participants,
    }
    return TrainingData(train, val, desc, sources, landmarks, record)


def synthetic_origin(data_dir: str | Path | None) -> str:
    """ "synthetic brains of maediff synth (seed S, site X)" for a benchmark that
    `maediff synth` wrote (its synthetic.json), else ""."""
    marker = Path(data_dir) / "synthetic.json" if data_dir is not None else None
    if marker is None or not marker.is_file():
        return ""
    try:
        about = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return "synthetic brains of maediff synth"
    return (
        f"synthetic brains of maediff synth (seed {about.get('seed', '?')}, "
        f"site {about.get('site', 'a')})"
    )


def epoch_batches(
    data: SliceSet,
    model: AnomalyModel,
    cfg: Config,
    gen: torch.Generator,
    per_rank: int,
    ddp: Distributed,
) -> Iterator[torch.Tensor]:
    """One epoch of this rank's batches: slices (B, 1, H, W) or volumes (B, S, 1, H, W).
    The epoch's order is drawn from `gen` when this is called."""
    if model.input_kind == "volumes":
        return data.volume_batches(shard(data.volume_order(gen), ddp), per_rank)
    pairs = data.epoch_indices(gen, cfg.data.all_slices, cfg.train.slices_per_volume)
    return data.batches(shard(pairs, ddp), per_rank)


def steps_per_epoch(
    data: SliceSet, model: AnomalyModel, cfg: Config, per_rank: int, world: int
) -> int:
    n = (
        len(data)
        if model.input_kind == "volumes"
        else data.epoch_size(cfg.data.all_slices, cfg.train.slices_per_volume)
    )
    return math.ceil(math.ceil(n / world) / per_rank)


__all__ = [
    "TrainingData",
    "epoch_batches",
    "prepare_training_data",
    "steps_per_epoch",
    "training_subjects",
]
