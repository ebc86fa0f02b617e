"""Record what a model was trained on in a model file made before the record existed
(maediff 0.9.0 and earlier): measure its training scans with the code `maediff train`
measures them with (training/data.py: prepare_training_data, data/qc.py) and write the
record into the file's configuration (data.trained_on), with its card made again. The
weights' bytes are not touched (training/export.py: add_training_record).

    maediff synth -o data/synthetic
    python benchmarks/record_training_data.py src/maediff/pretrained/maediff-cpu.safetensors \\
        --data data/synthetic --contrast T2w

--data is the run's training data in pDDPM's layout (its IXI fold: the model's
data.fold); --train-list a folder, CSV or BIDS data set as `maediff train` takes it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from maediff.training.data import prepare_training_data
from maediff.training.export import add_training_record
from maediff.weights import read_checkpoint, weights_sha256


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="the model file to add the record to")
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="the training data in pDDPM's layout")
    source.add_argument("--train-list", help="the training scans (folder, CSV, BIDS)")
    ap.add_argument("--contrast", help="the scans' contrast as a BIDS suffix (T2w, FLAIR, ...)")
    ap.add_argument("-o", "--output", help="the file to write (default: the model file itself)")
    args = ap.parse_args(argv)
    cfg, tensors, _ = read_checkpoint(args.model)
    before = weights_sha256(tensors)
    data = prepare_training_data(
        cfg, args.data, args.train_list, progress=False, contrast=args.contrast
    )
    out = add_training_record(args.model, args.output or args.model, data.record)
    after = weights_sha256(read_checkpoint(out)[1])
    if after != before:
        raise SystemExit(f"{out}: the weights changed ({before[:12]} -> {after[:12]})")
    print(
        f"{Path(out)}: {data.record.scans} training scans recorded; weights {after[:12]} unchanged"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
