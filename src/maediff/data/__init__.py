"""Brain volumes in and out: NIfTI IO, splits, load-time processing, slices, and the
offline synthetic benchmark."""

from .datasets import SliceSet, load_subject, load_volumes, slices_to_volume, volume_to_slices
from .io import DataError, Subject, load_nifti, save_like
from .load import PreparedVolume, prepare_volume
from .splits import read_folder, read_inputs, read_pddpm_split, read_subject_csv

__all__ = [
    "DataError",
    "PreparedVolume",
    "SliceSet",
    "Subject",
    "load_nifti",
    "load_subject",
    "load_volumes",
    "prepare_volume",
    "read_folder",
    "read_inputs",
    "read_pddpm_split",
    "read_subject_csv",
    "save_like",
    "slices_to_volume",
    "volume_to_slices",
]
