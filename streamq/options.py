"""Run options (everything about a compress run except the method) and the output folder's fixed names."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from streamq.errors import StreamqError

MANIFEST = "streamq_manifest.json"
REPORT = "streamq_report.json"
INDEX = "model.safetensors.index.json"
EXPORT_MARKER = "streamq_export.json"  # in a folder `streamq export` wrote: written before it is renamed into place
WORK_DIR = ".streamq-work"  # inside the output folder: the activation store while a run is unfinished
DEFAULT_CALIB = Path(__file__).parent / "data" / "calib.txt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")


@dataclass(frozen=True)
class RunOptions:
    """Everything about a run except the method. Units: shard_size in bytes; seqlen in tokens."""

    calib: str | None = None  # path or spec string; None = the shipped calibration text
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # compute dtype: auto = float32 on CPU, the checkpoint's 16-bit dtype on GPU
    offload: str = "disk"  # where block inputs live: disk (zarr) | ram
    shard_size: int = 5 * 10**9
    resume: str = "auto"  # auto: continue a matching run | restart: discard it | never: refuse a used folder
    keep_activations: bool = False
    progress: bool = True
    cpu_blocks: tuple[int, ...] = ()  # blocks run on the CPU whatever the device (planned from --max-vram)
    formats: tuple[str, ...] = ()  # output formats (streamq/formats): the first layout one is OUT's, the rest
    # are exported into OUT/<format>/ at the end; () = the method's default (gptq; spqr for SpQR)

    def __post_init__(self):
        if self.offload not in ("disk", "ram"):
            raise StreamqError(f"--offload {self.offload!r}: choose disk or ram")
        if self.nsamples < 1 or self.seqlen < 1:
            raise StreamqError(f"--nsamples {self.nsamples} / --seqlen {self.seqlen}: both must be positive")
        if self.shard_size < 1:
            raise StreamqError(f"--shard-size {self.shard_size}: must be positive")
        if self.resume not in ("auto", "restart", "never"):
            raise StreamqError(f"resume mode {self.resume!r}: choose auto, restart or never")
        from streamq.formats import parse_formats

        object.__setattr__(self, "formats", parse_formats(self.formats))
