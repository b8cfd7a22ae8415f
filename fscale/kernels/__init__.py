"""Triton/Gluon kernels, each beside its torch reference (design notes: README.md here).

Importing this package, which any ``fscale.kernels.<module>`` import does first,
registers the quantized linears' lowerings in the kernel table (``_lowerings``).
"""

from fscale.kernels import _lowerings  # noqa: F401
