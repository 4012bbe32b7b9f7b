"""streamq: compress large language models block by block, on machines far too small to hold them."""
__version__ = "0.1.0"

from streamq.config import QuantConfig  # noqa: E402
from streamq.errors import StreamqError  # noqa: E402


def compress(model, out, method: str = "gptq", preset: str | None = None, should_stop=lambda: False, **kwargs):
    """Compress a Hugging Face model folder into a GPTQ-format folder.

    kwargs: QuantConfig and RunOptions fields (None = the default); `seed` seeds both the calibration windows
    and the method. preset: a named recipe of the method (`streamq.config.PRESETS`) whose values fill the
    fields not given. should_stop: polled after each block; when it returns True the run stops there, raising
    `streamq.interrupt.Interrupted` (the folder resumes with the same call).
    """
    from streamq.config import apply_preset
    from streamq.pipeline import RunOptions, compress as run

    kwargs = apply_preset(method, preset, {k: v for k, v in kwargs.items() if v is not None})
    fields = set(QuantConfig.__dataclass_fields__)
    cfg = QuantConfig(method=method, **{k: v for k, v in kwargs.items() if k in fields})
    opts = RunOptions(**{k: v for k, v in kwargs.items() if k not in fields or k == "seed"})
    return run(model, out, cfg, opts, should_stop)


def evaluate(model, data, seqlen: int = 2048, **kwargs) -> float:
    """Streaming perplexity of a source or streamq output folder on a text file."""
    from streamq.perplexity import perplexity

    return perplexity(model, data, seqlen, **kwargs)


def load(folder, **kwargs):
    """A transformers model whose Linears dequantize a streamq/GPTQ folder's weights on the fly."""
    from streamq.loading import load_quantized

    return load_quantized(folder, **kwargs)


__all__ = ["compress", "evaluate", "load", "QuantConfig", "StreamqError", "__version__"]
