"""SparseGPT (Frantar & Alistarh 2023): prune each Linear to a target sparsity (unstructured or N:M) through
the inverse Hessian, quantizing the kept weights in the same pass (quant/sparsegpt.py); --bits 16 prunes only
(dense fp16 weights, formats/dense.py)."""
from __future__ import annotations

from streamq.config import QuantConfig
from streamq.errors import StreamqError
from streamq.methods import Method
from streamq.quant.sparsegpt import parse_mask, sparsegpt_prune


def solve(W, H, cfg):
    out = sparsegpt_prune(W, H, cfg)
    return out.result, out.loss, out.damp


def default_sparsity(c: dict) -> float:
    """N/M for an N:M mask, else 0.5 (the paper's and llm-compressor's usual target)."""
    n, m = parse_mask(c["mask_structure"])
    return n / m if m else 0.5


def check(cfg: QuantConfig) -> None:
    """SparseGPT's rules on a config."""
    if not 0 <= cfg.sparsity < 1:  # also rejects nan
        raise StreamqError(f"--sparsity {cfg.sparsity}: must lie in [0, 1) (the fraction of weights pruned)")
    n, m = parse_mask(cfg.mask_structure)
    if m and abs(cfg.sparsity - n / m) > 1e-9:
        raise StreamqError(f"--sparsity {cfg.sparsity} with --mask-structure {cfg.mask_structure}: an N:M mask "
                           f"prunes exactly N/M = {n / m:g} of every row; drop --sparsity or give {n / m:g}")
    if m and cfg.block_columns % m:
        raise StreamqError(f"block_columns {cfg.block_columns}: must be a multiple of M = {m} "
                           f"(--mask-structure {cfg.mask_structure})")
    if m and cfg.bits != 16 and cfg.group_size != -1 and cfg.group_size % m:
        raise StreamqError(f"--group-size {cfg.group_size}: must be a multiple of M = {m} "
                           f"(--mask-structure {cfg.mask_structure}) or -1")
    if cfg.bits == 16 and (not cfg.sym or cfg.full_range or cfg.grid_search != "minmax"):
        raise StreamqError("--bits 16 prunes only (weights stay fp16, no grid): drop --asym / --full-range / "
                           "--grid-search")


METHOD = Method(
    name="sparsegpt",
    fields=("sparsity", "mask_structure", "full_range", "damp", "block_columns", "true_sequential",
            "grid_search"),
    defaults={"sparsity": default_sparsity},
    solve=solve,
    check=check,
    dense_bits=16,
    reference="tests.reference:reference_sparsegpt",
)
