"""offload's private pieces: configuration, param source, grad streaming, plan."""
