"""The jobs the commands run: detection on scans, the evaluation protocol on a data set,
the benchmark of many models, and the offline demo. Each composes models/, data/,
training/ and evaluation/; nothing below imports from here."""
