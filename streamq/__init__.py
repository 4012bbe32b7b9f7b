"""streamq: compress large language models block by block, on machines far too small to hold them."""
__version__ = "0.1.0"

from streamq.config import QuantConfig  # noqa: E402
from streamq.errors import StreamqError  # noqa: E402


def compress(model, out, method: str = "gptq", **kwargs):
    """Compress a Hugging Face model folder into a GPTQ-format folder. kwargs: QuantConfig and RunOptions fields."""
    from streamq.pipeline import RunOptions, compress as run

    fields = set(QuantConfig.__dataclass_fields__)
    cfg = QuantConfig(method=method, **{k: v for k, v in kwargs.items() if k in fields})
    return run(model, out, cfg, RunOptions(**{k: v for k, v in kwargs.items() if k not in fields}))


def evaluate(model, data, seqlen: int = 2048, **kwargs) -> float:
    """Streaming perplexity of a source or streamq output folder on a text file."""
    from streamq.perplexity import perplexity

    return perplexity(model, data, seqlen, **kwargs)


def load(folder, **kwargs):
    """A transformers model whose Linears dequantize a streamq/GPTQ folder's weights on the fly."""
    from streamq.loading import load_quantized

    return load_quantized(folder, **kwargs)


__all__ = ["compress", "evaluate", "load", "QuantConfig", "StreamqError", "__version__"]
