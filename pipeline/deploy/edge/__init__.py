"""What goes onto the device: the bundle's runtime files, kept here as importable modules.

Every module in this folder runs with numpy, onnxruntime and Pillow only (no torch,
nothing from this package) because it is copied as is into each edge bundle:
``edge_runtime.py`` (safe model loading, image reading, timing, peak memory),
``run.py`` (top-k classes of an image or a CSV for a folder), ``bench.py`` (the latency
table) and ``build_engine.py`` (the TensorRT engine build, 10.x and 11.x). The
pipeline imports ``edge_runtime`` and ``build_engine`` from here, so the code measured
and tested in the pipeline is the code the device runs.
"""
