"""fscale.serve: a paged-KV, continuously batched inference engine (Dynamic SplitFuse).

Usage::

    from fscale.serve import Engine, SamplingParams
    engine = Engine("path/to/model-dir")
    print(engine.generate("Hello", SamplingParams(max_tokens=16, temperature=0))[0].text)

Design notes for the next engineer: ``fscale/serve/README.md``.
"""

from fscale.serve.engine import Engine
from fscale.serve.errors import EngineFull
from fscale.serve.params import RequestOutput, SamplingParams

__all__ = ["Engine", "EngineFull", "RequestOutput", "SamplingParams"]
