"""Reports: the results table of every deployed model and variant, and the accuracy/latency Pareto plot.

:mod:`~pipeline.report.results` joins the deploy stages' JSON (accuracy of each file,
benchmark figures, parity) with the evaluate metrics (params, MACs) into one row per
model x variant (:mod:`~pipeline.report.rows`), decides the Pareto front and the pick under
each profile's budgets beyond noise only (:mod:`~pipeline.report.decisions`: paired McNemar
tests, separated latency intervals, one graph a tie) and writes ``reports/results.{json,md}``;
:mod:`~pipeline.report.plots` draws ``reports/pareto.png``. :mod:`~pipeline.report.metrics`
lists the evaluate stage's metrics of a workspace (``kdpipe results``) and
:mod:`~pipeline.report.sweep` aggregates a sweep. None needs torch.
"""
