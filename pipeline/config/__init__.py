"""Typed schemas of params.yaml, one module per concern; :mod:`pipeline.params` assembles the whole file.

* :mod:`pipeline.config.base`: :class:`~pipeline.config.base.ConfigError`, the strict base model,
  error messages that name the key, the value and what is allowed;
* :mod:`pipeline.config.training`: ``data``, ``train``, ``teacher``, ``students``, ``evaluate``;
* :mod:`pipeline.config.deploy`: ``export``, ``quantize``, ``tensorrt``, ``bundle``, ``benchmark``, ``report``;
* :mod:`pipeline.config.methods`: the ``distill`` and ``online`` sections, built from the schemas
  each method declares in its own module (``pipeline/distill/offline/<name>.py``, ``online/<name>.py``).

This package imports none of its modules, so a stage depends only on the schemas it reads
(``dvc.yaml`` lists them per stage).
"""
