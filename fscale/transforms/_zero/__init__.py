"""shard_zero's private pieces: shard layout, ZeRO-2 grad buckets, ZeRO-3 gathers."""
