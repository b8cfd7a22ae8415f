"""Private pieces of ``compress_comm`` (transforms/compress.py): a module per method family."""
