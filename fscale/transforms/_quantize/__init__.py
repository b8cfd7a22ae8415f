"""quantize's private pieces (the public transform is ``fscale/transforms/quantize.py``).

``codec.py`` the formats and how each packs and runs its linear; ``weight.py`` the
``QuantizedWeight`` tensor and the ops it sends to the kernels; ``select.py`` which
params are quantized by default; ``report.py`` what ``quantize_report`` and
``fs.explain`` print.
"""
