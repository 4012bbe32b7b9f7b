"""Triton kernels, installed as `streamq.kernels` (pyproject's package-dir maps this folder there).

Hugging Face's package is also called `kernels`, and transformers >= 5.25 requires and imports it. Where a
checkout's root is on sys.path (`python -m pytest`, `python -c` run there), this folder is found first as the
top-level `kernels`; it then loads Hugging Face's package in its place, so `import transformers` still works
(where that package is not installed it stays this folder, which transformers, finding no version, ignores).
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _here = os.path.realpath(__file__)  # real paths: the root may be on sys.path under several names (symlinks)
    _root = os.path.dirname(os.path.dirname(_here))
    _path = [p for p in sys.path if os.path.realpath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is not None and _spec.loader is not None and os.path.realpath(_spec.origin or "") != _here:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds after this file runs
        _spec.loader.exec_module(_module)
