"""Reporting: what an evaluation writes and shows, apart from the protocol that computes it.

`maediff.evaluation` computes (pure functions on arrays: post-processing, thresholds,
metrics, aggregation); this package writes and draws, and reads back what was written:

- files.py: per-volume CSVs and JSON, written atomically;
- summary.py: summary.json as a typed EvaluationSummary (read, written, older ones read);
- tables.py: the metric tables of `maediff report` and `maediff benchmark`, and the
  tables by lesion and without lesion labels;
- comparison.py: the benchmark's marks, paired tests and comparison figure;
- report.py: the figures (PR curves, Dice distributions, examples) and the HTML page;
- runs.py: the report of saved evaluations (`maediff report`: load_summary, write_report).

The doors go one way: reporting imports evaluation, never the reverse, and nothing
here imports torch or a model (tests/test_report.py), so `maediff report` stays light.
"""
