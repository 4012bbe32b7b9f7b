"""The kernels folder, run from a checkout's root: `import kernels` is Hugging Face's package, not this folder."""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = "import kernels, streamq.kernels.gptq as g; print(kernels.__file__); print(g.__file__)"


def test_top_level_kernels_from_the_checkout_root_is_not_this_folder():
    """transformers >= 5.25 imports Hugging Face's `kernels`; with the root on sys.path it must still get it."""
    run = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True)
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:  # not installed: the folder stays itself (transformers, which
        installed = False                              # then imports it to look for a version, finds none)
    else:
        installed = True
    assert run.returncode == 0, run.stderr
    hub, ours = run.stdout.split()
    if not installed:
        assert Path(hub).resolve() == ROOT / "kernels" / "__init__.py"
        return
    assert not Path(hub).resolve().is_relative_to(ROOT / "kernels"), hub  # (CI's venv lies inside the root)
    assert Path(ours).resolve() == ROOT / "kernels" / "gptq.py"
