"""tensor_parallel's private parts: the split styles."""
