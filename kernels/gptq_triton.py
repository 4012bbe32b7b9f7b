"""Triton kernels for the GPTQ layout (streamq/formats/gptq.py) with groups of consecutive columns (static-groups
order: g_idx[c] = c // GS). Imported by kernels/gptq.py at the first launch (see kernels/launch.py).

Both kernels walk the input dimension K in BLOCK_K tiles that lie inside one group (GS % BLOCK_K == 0), so a
tile needs one row of scales and zero points. A code of input k and output n sits in word k // PER of column n
of qweight, at bit (k % PER) * BITS (PER = 32 // BITS codes per word); zero points are packed the same way along
the output dimension, minus 1.
"""
import triton
import triton.language as tl


@triton.jit
def _tile(qweight, qzeros, scales, k0, n, nmask, N, BITS: tl.constexpr, GS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dequantized W^T tile [BLOCK_K, BLOCK_N] fp32 for inputs k0 .. k0 + BLOCK_K and outputs n."""
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    k = k0 + tl.arange(0, BLOCK_K)
    words = tl.load(qweight + (k // PER)[:, None] * N + n[None, :], mask=nmask[None, :], other=0)
    codes = (words >> ((k % PER) * BITS)[:, None]) & MASK  # arithmetic shift of int32: the mask drops the sign
    g = k0 // GS
    scale = tl.load(scales + g * N + n, mask=nmask, other=0).to(tl.float32)
    zword = tl.load(qzeros + g * (N // PER) + n // PER, mask=nmask, other=0)
    zero = ((zword >> ((n % PER) * BITS)) & MASK) + 1
    return (codes - zero[None, :]).to(tl.float32) * scale[None, :]


@triton.jit
def matmul_kernel(x, qweight, qzeros, scales, y, M, N, K, stride_xm,
                  BITS: tl.constexpr, GS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, IEEE: tl.constexpr):
    """y[M, N] (fp32, zeroed when SPLIT_K > 1) += x[M, K] @ W^T for M <= BLOCK_M tokens. Program (pid_n, pid_k)
    owns outputs pid_n * BLOCK_N .. and the pid_k-th of SPLIT_K equal slices of K; slices meet by atomic adds."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, nmask = m < M, n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    span = K // SPLIT_K
    for k0 in range(pid_k * span, (pid_k + 1) * span, BLOCK_K):
        w = _tile(qweight, qzeros, scales, k0, n, nmask, N, BITS, GS, BLOCK_K)
        xt = tl.load(x + m[:, None] * stride_xm + (k0 + tl.arange(0, BLOCK_K))[None, :], mask=mmask[:, None],
                     other=0)
        if IEEE:  # fp32 activations: exact fp32 products, no TF32
            acc += tl.dot(xt.to(tl.float32), w, input_precision="ieee")
        else:  # 16-bit activations: the tile in their dtype, on the tensor cores, fp32 accumulation
            acc += tl.dot(xt, w.to(xt.dtype))
    ptr = y + m[:, None] * N + n[None, :]
    mask = mmask[:, None] & nmask[None, :]
    if SPLIT_K == 1:
        tl.store(ptr, acc, mask=mask)
    else:
        tl.atomic_add(ptr, acc, mask=mask)


@triton.jit
def dequant_kernel(qweight, qzeros, scales, w, N, K, BITS: tl.constexpr, GS: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """w[N, K] (any float dtype: stored cast) = W, one [BLOCK_N, BLOCK_K] tile per program."""
    k0 = tl.program_id(0) * BLOCK_K
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    tile = _tile(qweight, qzeros, scales, k0, n, nmask, N, BITS, GS, BLOCK_K)
    k = k0 + tl.arange(0, BLOCK_K)
    tl.store(w + n[None, :].to(tl.int64) * K + k[:, None], tile, mask=nmask[None, :])
