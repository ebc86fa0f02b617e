"""BIDS data sets in (docs/data.md §BIDS), indexed with pybids.

    subjects = read_bids("ds/", participants={"group": "control"})

Every scan of one contrast of the raw data set (`sub-*/[ses-*/]anat/*_T2w.nii[.gz]` by
default; the suffix is the model's recorded contrast, or `--suffix`) is a Subject named
after its file (`sub-01_ses-1_T2w`). From any derivatives folder of the
data set (`derivatives/*/`, each with its dataset_description.json) the scan gets, when
they exist for the same subject, session, acquisition and run:

- a brain mask: `*_desc-brain_mask.nii[.gz]`;
- lesion labels: `*_label-lesion_mask.nii[.gz]` (or `*_desc-lesion_mask`,
  `*_label-lesion_dseg`); any non-zero voxel is a lesion.

`participants` selects subjects by the columns of participants.tsv (all given columns
must match; values compared as text): healthy subjects for training, patients for an
evaluation. Where no brain mask exists (a data set of raw scans without derivatives
included) the brain is `image > 0`, as for any NIfTI scan without a NAME_mask companion
(data/load.py).

Outputs of `detect` on a BIDS input go to a derivatives data set: `write_description`
writes its dataset_description.json; the files keep the input's folders
(sub-*/[ses-*/]anat/) and BIDS names (pipeline/detect.py: output_paths).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from ..outputs import safe_name
from .io import DataError, Subject

NIFTI_EXTENSIONS = [".nii.gz", ".nii"]
MATCH = ("subject", "session", "acquisition", "run")
LESION_QUERIES = (
    {"suffix": "mask", "label": "lesion"},
    {"suffix": "mask", "desc": "lesion"},
    {"suffix": "dseg", "label": "lesion"},
)


def is_bids(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "dataset_description.json").is_file()


def _layout(root: Path):
    try:
        from bids import BIDSLayout
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise DataError("reading a BIDS data set needs pybids (pip install pybids)") from e
    deriv = root / "derivatives"
    folders = sorted(p for p in deriv.iterdir() if p.is_dir()) if deriv.is_dir() else []
    for f in folders:
        if not (f / "dataset_description.json").is_file():
            raise DataError(
                f"BIDS derivatives folder {f} has no dataset_description.json "
                '(it needs at least {"Name": ..., "BIDSVersion": ..., "DatasetType": "derivative"})'
            )
    try:
        return BIDSLayout(root, validate=False, derivatives=[str(f) for f in folders] or False)
    except Exception as e:  # pybids raises several kinds for a malformed data set
        raise DataError(f"{root} could not be read as a BIDS data set: {e}") from e


def participants_table(root: Path) -> list[dict[str, str]]:
    f = root / "participants.tsv"
    if not f.is_file():
        return []
    lines = [line.rstrip("\n").split("\t") for line in f.read_text().splitlines() if line.strip()]
    if not lines or "participant_id" not in lines[0]:
        raise DataError(f"{f} needs a participant_id column")
    head = lines[0]
    return [dict(zip(head, row)) for row in lines[1:]]


def select_participants(root: Path, participants: Mapping[str, str] | None) -> set[str] | None:
    """Subject labels (without 'sub-') whose participants.tsv row matches every
    column = value of `participants`; None when no selection is asked for."""
    if not participants:
        return None
    rows = participants_table(root)
    if not rows:
        raise DataError(f"{root} has no participants.tsv to select {dict(participants)} from")
    missing = [c for c in participants if c not in rows[0]]
    if missing:
        raise DataError(
            f"{root / 'participants.tsv'} has no column(s) {missing}; it has {list(rows[0])}"
        )
    chosen = {
        r["participant_id"].removeprefix("sub-")
        for r in rows
        if all(r.get(c, "") == str(v) for c, v in participants.items())
    }
    if not chosen:
        raise DataError(
            f"no participant of {root / 'participants.tsv'} matches {dict(participants)}"
        )
    return chosen


def read_bids(
    root: str | Path,
    participants: Mapping[str, str] | None = None,
    lesions: bool | None = None,
    suffix: str = "T2w",
) -> list[Subject]:
    """The scans of one contrast (`suffix`: T2w, FLAIR, T1w, ...) of a BIDS data set
    with their masks and lesion labels (module docstring), sorted by name. lesions: True
    keeps only scans with lesion labels, False only those without, None all."""
    root = Path(root)
    if not is_bids(root):
        raise DataError(f"{root} is not a BIDS data set (no dataset_description.json)")
    layout = _layout(root)
    # without derivatives (raw scans only) pybids knows no derivative entities (desc,
    # label) to ask for: no scan has a mask or labels, the brain is taken from the image
    derivatives = bool(layout.derivatives)
    chosen = select_participants(root, participants)
    scans = layout.get(scope="raw", datatype="anat", suffix=suffix, extension=NIFTI_EXTENSIONS)
    subjects = []
    for f in scans:
        ents = f.get_entities()
        if chosen is not None and ents.get("subject") not in chosen:
            continue
        mask, seg = _derived_files(layout, ents) if derivatives else ([], [])
        for kind, hits in (("brain mask", mask), ("lesion label", seg)):
            if len(hits) > 1:
                raise DataError(
                    f"{f.path}: {len(hits)} {kind} files match it: {[h.path for h in hits]}"
                )
        name = Path(f.path).name
        for ext in NIFTI_EXTENSIONS:
            name = name.removesuffix(ext)
        s = Subject(
            safe_name(name, f"BIDS data set {root}"),
            Path(f.path),
            Path(mask[0].path) if mask else None,
            Path(seg[0].path) if seg else None,
            int(bool(seg)),
            _scan_folder(root, Path(f.path)),
        )
        if lesions is None or bool(seg) == lesions:
            subjects.append(s)
    if not subjects:
        what = {True: " with lesion labels", False: " without lesion labels", None: ""}[lesions]
        sel = f" among participants {dict(participants)}" if participants else ""
        raise DataError(f"no {suffix} scans{what}{sel} in the BIDS data set {root}")
    return sorted(subjects, key=lambda s: s.name)


def _scan_folder(root: Path, scan: Path) -> str:
    """The scan's folder relative to the data set (sub-01/ses-1/anat), the same whether
    the data set is reached through a symbolic link or not (folders resolved, the file
    not: an annexed scan is a link into .git)."""
    try:
        rel = scan.parent.resolve().relative_to(root.resolve())
    except ValueError as e:
        raise DataError(f"{scan} lies outside the BIDS data set {root}") from e
    for part in rel.parts:  # BIDS labels become output folders
        safe_name(part, f"BIDS data set {root}")
    return rel.as_posix()


def _derived_files(layout, ents: dict) -> tuple[list, list]:
    """(brain masks, lesion labels) of the derivatives with the scan's subject, session,
    acquisition and run."""
    match = {k: ents.get(k) for k in MATCH}
    query = {k: v for k, v in match.items() if v is not None}
    # entities the scan lacks must be absent from the derivative too
    absent = {k: None for k, v in match.items() if v is None}
    kw = {"scope": "derivatives", "extension": NIFTI_EXTENSIONS, **query, **absent}
    mask = layout.get(suffix="mask", desc="brain", **kw)
    seg = next((hit for q in LESION_QUERIES if (hit := layout.get(**q, **kw))), [])
    return mask, seg


def split_every(subjects: list[Subject], fraction: float) -> tuple[list[Subject], list[Subject]]:
    """(rest, held out): every round(1 / fraction)-th subject (sorted by name, first
    included) is held out, so the split does not depend on the order files are found."""
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction {fraction} must be in (0, 1)")
    k = max(2, round(1 / fraction))
    ordered = sorted(subjects, key=lambda s: s.name)
    held = [s for i, s in enumerate(ordered) if i % k == 0]
    rest = [s for i, s in enumerate(ordered) if i % k != 0]
    if not rest:
        raise DataError(f"{len(subjects)} subject(s) are too few to hold out {fraction:.0%}")
    return rest, held


def parse_participants(pairs: list[str] | None) -> dict[str, str] | None:
    """['group=control', 'site=A'] -> {'group': 'control', 'site': 'A'}."""
    if not pairs:
        return None
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise ValueError(f"--participants takes COLUMN=VALUE, got {p!r}")
        out[key] = value
    return out


def write_description(out_dir: str | Path, source: str | Path) -> Path:
    """dataset_description.json of a derivatives data set written by maediff."""
    from .._version import __version__

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(source).resolve()
    desc = {
        "Name": "maediff anomaly maps",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "maediff", "Version": __version__}],
        "SourceDatasets": [{"URL": src.as_uri()}],
    }
    path = out / "dataset_description.json"
    tmp = path.with_name(".dataset_description.json.tmp")
    tmp.write_text(json.dumps(desc, indent=2) + "\n")
    tmp.replace(path)
    return path


__all__ = [
    "is_bids",
    "parse_participants",
    "read_bids",
    "select_participants",
    "split_every",
    "write_description",
]
