"""Private pieces of ``compress_comm`` (fscale/transforms/compress.py): one module per method family."""
