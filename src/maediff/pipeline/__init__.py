"""The jobs the commands run: detection on scans, the evaluation protocol on a data set,
the calibration of thresholds, and the offline demo. Each composes models/, data/,
training/ and evaluation/; nothing below imports from here (the benchmark, a package of
its own, maediff/benchmark/, is above it)."""
