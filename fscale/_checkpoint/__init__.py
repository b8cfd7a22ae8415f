"""The private parts of ``fs.save`` / ``fs.load`` (``fscale/checkpoint.py``)."""
