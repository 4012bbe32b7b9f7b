"""streamq: compress large language models block by block, on machines far too small to hold them."""
__version__ = "0.1.0"

import os as _os

# torch's OpenMP workers (GNU libgomp) spin up to ~300k pause loops (milliseconds) after each parallel op before
# they sleep; when anything else wants the 2 cores a 2-core box has, that spinning starves the thread doing the
# work (a SmolLM2 block forward + Hessian: ~1 s instead of ~0.2 s at load 10). 10k loops still bridge the
# Python gaps between one op and the next. Scheduling only: the same bits. Read when libgomp loads (with torch),
# so it must precede any torch import; an explicit setting wins.
_os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from streamq.config import QuantConfig  # noqa: E402
from streamq.errors import StreamqError  # noqa: E402


def compress(model, out, method: str = "gptq", preset: str | None = None, should_stop=lambda: False, **kwargs):
    """Compress a Hugging Face model folder into a GPTQ-format folder (SpQR: streamq's SpQR layout).

    kwargs: QuantConfig and RunOptions fields (None = the default: the method's own, see streamq.methods); `seed`
    seeds the calibration windows and, for AutoRound, its minibatch sampler. A field the method does not read
    raises StreamqError.
    preset: a named recipe of the method (`streamq.config.PRESETS`) whose values fill the fields not given.
    should_stop: polled after each block; when it returns True the run stops there, raising
    `streamq.interrupt.Interrupted` (the folder resumes with the same call).
    max_ram / max_vram / max_disk: budgets in bytes; the run is planned inside them up front (`plan`), offload
    chosen by the plan unless given, and refused with the smallest budget that would fit when none does.
    """
    from streamq.pipeline import compress as run

    budgets = {k: kwargs.pop(k, None) for k in BUDGETS}
    cfg, opts = _configs(method, preset, kwargs)
    if any(v is not None for v in budgets.values()):
        from streamq.planner import apply_plan

        opts = apply_plan(model, out, cfg, opts, kwargs.get("offload") is not None, **budgets)
    return run(model, out, cfg, opts, should_stop)


def plan(model, method: str = "gptq", preset: str | None = None, benchmark: bool = True, **kwargs):
    """The plan of `compress(model, ..., method, preset, **kwargs)` without running it: bytes per block, largest
    Hessian, activation store, output, predicted peak RAM / VRAM / disk and the decisions that keep the run
    inside max_ram / max_vram / max_disk (bytes), as a `streamq.planner.Plan`; raises StreamqError naming the
    smallest budget that fits when none does. benchmark: time a few kernels here to estimate the run time."""
    from streamq.planner import make_plan

    budgets = {k: kwargs.pop(k, None) for k in BUDGETS}
    cfg, opts = _configs(method, preset, kwargs)
    return make_plan(model, cfg, opts, **budgets, fixed_offload=kwargs.get("offload") is not None,
                     benchmark=benchmark)


BUDGETS = ("max_ram", "max_vram", "max_disk")


def _configs(method: str, preset: str | None, kwargs: dict):
    """(QuantConfig, RunOptions) from compress()'s keyword arguments."""
    from streamq.config import apply_preset
    from streamq.options import RunOptions

    from streamq.methods import get_method

    kwargs = apply_preset(method, preset, {k: v for k, v in kwargs.items() if v is not None})
    fields = set(QuantConfig.__dataclass_fields__)
    if get_method(method) is not None and "seed" not in get_method(method).fields:
        fields.discard("seed")  # then only the calibration windows' seed
    cfg = QuantConfig(method=method, **{k: v for k, v in kwargs.items() if k in fields})
    opts = RunOptions(**{k: v for k, v in kwargs.items() if k not in fields or k == "seed"})
    return cfg, opts


def evaluate(model, data, seqlen: int = 2048, allow_incomplete: bool = False, **kwargs) -> float:
    """Streaming perplexity of a source or streamq output folder on a text file (an unfinished output, or one a
    compress run is writing, is refused unless allow_incomplete)."""
    from streamq.io.manifest import reading
    from streamq.perplexity import perplexity

    with reading(model, allow_incomplete):
        return perplexity(model, data, seqlen, **kwargs)


def load(folder, **kwargs):
    """A transformers model whose Linears dequantize a streamq (GPTQ or SpQR) folder's weights on the fly
    (allow_incomplete=True: read an unfinished or manifest-less folder too)."""
    from streamq.loading import load_quantized

    return load_quantized(folder, **kwargs)


__all__ = ["compress", "evaluate", "load", "plan", "QuantConfig", "StreamqError", "__version__"]
