"""What goes onto the device: the bundle's runtime files, kept here as importable modules.

Every module in this folder runs with numpy, onnxruntime and Pillow only (no torch,
nothing from this package) because it is copied as is into each edge bundle:
``edge_runtime.py`` (safe model loading, sessions, image reading), ``edge_measure.py``
(cold start, peak memory and latency, each in worker processes), ``edge_timing.py``
(interleaved timing rounds and latency intervals), ``run.py`` (top-k classes of an
image or a CSV for a folder), ``bench.py`` (the latency table) and ``build_engine.py``
(the TensorRT engine build, 10.x and 11.x). The pipeline imports them from here (the
benchmark stage runs ``edge_measure.py`` itself), so the code measured and tested in
the pipeline is the code the device runs.
"""
