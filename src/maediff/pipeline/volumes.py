"""The reconstructed volumes of one evaluation, each computed once per t_test.

The protocol reconstructs a volume with every patch and the evaluation's noise seed
(detect.reconstruct_subject). Before the evaluation proper reads its volumes, choosing
t_test (choose_t.py) reconstructs the unhealthy validation volumes at each candidate t,
and normative scoring (evaluation/normative.py) the first healthy validation volumes:
`Reconstructions` holds what was computed at a t (keyed by the t and the scan's file)
and hands it out again, once, instead of computing it again.

    volumes = Reconstructions(model, data_cfg, seed)
    name, image, brain, seg, rec, affine = volumes.get(subject, keep=True)  # held
    volumes.forget(t)                                  # a candidate t that lost
    stream = volumes.stream(plan.subjects(), pool)     # held ones, then workers or here
    for v in volume_results(subjects, stream):         # VolumeResult, in reading order
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from ..data.splits import Subject
from ..evaluation.protocol import VolumeResult
from .detect import reconstruct_subject

if TYPE_CHECKING:
    from ..config import DataConfig
    from ..models import AnomalyModel
    from .workers import ReconstructionPool

# (name, image, brain mask, segmentation, reconstruction, affine): reconstruct_subject
Reconstructed = tuple[str, np.ndarray, np.ndarray, "np.ndarray | None", np.ndarray, np.ndarray]


def t_test_of(model: AnomalyModel) -> int | None:
    """The diffusion models' test noise level; None for others (AnomalyModel.t_test)."""
    return model.t_test


class Reconstructions:
    """The protocol's reconstruction of each subject at the model's current t_test,
    computed once: `get(keep=True)` holds it until `stream` hands it out (or `forget`
    drops its t)."""

    def __init__(self, model: AnomalyModel, data_cfg: DataConfig, seed: int):
        self.model, self.data_cfg, self.seed = model, data_cfg, seed
        self._held: dict[tuple[int | None, str], Reconstructed] = {}

    def _key(self, subject: Subject) -> tuple[int | None, str]:
        return t_test_of(self.model), str(subject.image)

    def holds(self, subject: Subject) -> bool:
        return self._key(subject) in self._held

    def get(self, subject: Subject, keep: bool = False) -> Reconstructed:
        """The subject's reconstruction at the current t: the held one, or computed here
        (and held with `keep`)."""
        key = self._key(subject)
        if key in self._held:
            return self._held[key]
        r = reconstruct_subject(self.model, subject, self.data_cfg, self.seed)
        if keep:
            self._held[key] = r
        return r

    def forget(self, t: int | None) -> None:
        """Drop what is held at noise level t."""
        for key in [k for k in self._held if k[0] == t]:
            del self._held[key]

    def stream(
        self, subjects: Sequence[Subject], pool: ReconstructionPool | None = None
    ) -> Iterator[Reconstructed]:
        """Each subject's reconstruction, in order: a held one is handed out (and no
        longer held), the others come from `pool` (one queue over all of them, so that
        no worker waits between splits) or are computed here."""
        todo = [s for s in subjects if not self.holds(s)]
        queue = pool.map(todo, self.data_cfg, self.seed) if pool is not None and todo else None
        for s in subjects:
            key = self._key(s)
            if key in self._held:
                yield self._held.pop(key)
            elif queue is not None:
                yield _next_of(queue, s.name)
            else:
                yield reconstruct_subject(self.model, s, self.data_cfg, self.seed)


def _next_of(stream: Iterator[Reconstructed], name: str) -> Reconstructed:
    item = next(stream)
    if item[0] != name:  # the protocol reads the volumes in the order they were queued
        raise RuntimeError(f"worker stream out of order: expected {name}, got {item[0]}")
    return item


def volume_results(
    subjects: Sequence[Subject],
    stream: Iterator[Reconstructed],
    bar: tqdm | None = None,
    keep: list[VolumeResult] | None = None,
    n_keep: int = 0,
    drawn: dict[str, list[dict]] | None = None,
) -> Iterator[VolumeResult]:
    """The next len(subjects) volumes of `stream` (which reads them in this order) as
    VolumeResults, one at a time, keeping the first n_keep in `keep` (the example
    figures).

    Under the protocol every patch is reconstructed (skip_empty_patches=False): the
    whole-volume l1 sees the model's output outside the brain too, as the reference."""
    for s in subjects:
        name, image, brain, seg, rec, affine = _next_of(stream, s.name)
        v = VolumeResult(name, image, rec, brain, seg, affine, (drawn or {}).get(name, []))
        if keep is not None and len(keep) < n_keep:
            keep.append(v)
        if bar is not None:
            bar.update()
        yield v


__all__ = ["Reconstructed", "Reconstructions", "t_test_of", "volume_results"]
