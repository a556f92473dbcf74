"""Reports: the results table of every deployed model and variant, and the accuracy/latency Pareto plot.

:mod:`~pipeline.report.results` joins the deploy stages' JSON (accuracy of each file,
benchmark figures, parity) with the evaluate metrics (params, MACs) into one row per
model x variant, finds the Pareto front and the best model under each profile's
latency budget, and writes ``reports/results.{json,md}``; :mod:`~pipeline.report.plots`
draws ``reports/pareto.png``. Neither needs torch.
"""
