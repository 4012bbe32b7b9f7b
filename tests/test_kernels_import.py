"""The kernels folder, run from a checkout's root: `import kernels` is Hugging Face's package, not this folder."""
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = "import kernels, streamq.kernels.gptq as g; print(kernels.__file__); print(g.__file__)"


def hub_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.parametrize("root_twice", [False, True], ids=["root", "root-and-a-symlink-to-it"])
def test_top_level_kernels_from_the_checkout_root_is_not_this_folder(tmp_path, root_twice):
    """transformers >= 5.25 imports Hugging Face's `kernels`; with the root on sys.path it must still get it (also
    with the root there under two names: the cwd and a symlink to it on PYTHONPATH)."""
    env = dict(os.environ)
    if root_twice:
        (tmp_path / "link").symlink_to(ROOT, target_is_directory=True)
        env["PYTHONPATH"] = str(tmp_path / "link")
    run = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    hub, ours = (Path(p).resolve() for p in run.stdout.split())
    assert ours == ROOT / "kernels" / "gptq.py"
    if not hub_kernels_installed():  # the folder stays itself (transformers, which then imports it to look for a
        assert hub == ROOT / "kernels" / "__init__.py"  # version, finds none)
    else:
        assert not hub.is_relative_to(ROOT / "kernels"), hub  # (CI's venv lies inside the root)
