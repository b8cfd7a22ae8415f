"""offload's private pieces (the public transform is ``fscale/transforms/offload.py``).

``config.py`` options and what a stack allows; ``layout.py`` sub-groups and slots;
``state.py`` ``OffloadState``; ``init.py`` building it; ``update.py`` the cpu,
delayed and NVMe update paths; ``stream.py`` grads streamed in backward;
``param_source.py`` ZeRO-3's param shards on the host; ``describe.py`` the state
protocol; ``plan.py`` what ``fs.explain`` shows.
"""
