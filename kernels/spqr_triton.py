"""Triton kernels for the SpQR layout (streamq/formats/spqr.py); launched by kernels/spqr.py, which imports this
module at the first launch (see kernels/launch.py).

Each dense program owns BLOCK_OUT output rows and BLOCK_IN-wide tiles of input positions: it unpacks the codes from
the packed bitstream (a value may straddle two words for 3 bits: both are read as one 64-bit field), rebuilds each
group's scale and zero (from their second-level codes, or fp16 scales and integer zeros), and either stores
scale * (code - zero) at the original column perm[j] (cast to the output's dtype) or dots it with x[perm[j]]. The
outlier kernel adds the CSR outliers of the same rows (no two outliers of a row share a column, so rows never race).
"""
import triton
import triton.language as tl


@triton.jit
def _unpack(ptr, word, stride, shift, mask, has_next, BITS: tl.constexpr):
    """BITS-bit values starting at bit `shift` of int32 word ptr[word] (the next word at word + stride) -> fp32."""
    field = tl.load(ptr + word, mask=mask, other=0).to(tl.uint32, bitcast=True).to(tl.int64)
    if 32 % BITS != 0:  # 3 bits: a value may continue in the next word
        nxt = tl.load(ptr + word + stride, mask=mask & has_next, other=0)
        field = field | (nxt.to(tl.uint32, bitcast=True).to(tl.int64) << 32)
    return ((field >> shift) & ((1 << BITS) - 1)).to(tl.float32)


@triton.jit
def _stat(codes, words, g, r, mask, BITS: tl.constexpr):
    """Code [g, r] of a statistic packed along the output dimension (`words` int32 words per group row)."""
    bit = r.to(tl.int64) * BITS
    return _unpack(codes, g[None, :] * words + (bit // 32)[:, None], 1, (bit % 32)[:, None], mask,
                   ((bit // 32 + 1) < words)[:, None], BITS)


@triton.jit
def dense_kernel(qweight, scode, zcode, s_qs, s_qz, z_qs, z_qz, qzeros, perm, x, out, OUT, IN,
                 BITS: tl.constexpr, GS: tl.constexpr, QQ: tl.constexpr, QS_BITS: tl.constexpr,
                 QZ_BITS: tl.constexpr, QQG: tl.constexpr, MATVEC: tl.constexpr,
                 BLOCK_OUT: tl.constexpr, BLOCK_IN: tl.constexpr):
    """Dense part: out[r, perm[j]] = scale * (code - zero) (MATVEC=False: program (i, t) does rows i * BLOCK_OUT ..
    and input tile t) or out[r] = sum_j that * x[perm[j]] (program i: rows i * BLOCK_OUT .., all inputs)."""
    r = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    rmask = r < OUT
    acc = tl.zeros((BLOCK_OUT,), dtype=tl.float32)
    start = 0 if MATVEC else tl.program_id(1) * BLOCK_IN
    stop = IN if MATVEC else start + BLOCK_IN
    for j0 in range(start, stop, BLOCK_IN):
        j = j0 + tl.arange(0, BLOCK_IN)
        jmask = j < IN
        m = rmask[:, None] & jmask[None, :]
        bit = j.to(tl.int64) * BITS  # weight codes are packed along the input dimension: word k of row r at [k, r]
        k = bit // 32
        code = _unpack(qweight, k[None, :] * OUT + r[:, None], OUT, (bit % 32)[None, :], m,
                       ((k + 1) < IN * BITS // 32)[None, :], BITS)
        g = j // GS
        if QQ:
            q = g[None, :] * (OUT // QQG) + (r // QQG)[:, None]  # second-level statistics of (group, row)
            sc = _stat(scode, OUT * QS_BITS // 32, g, r, m, QS_BITS)
            s2, z2 = tl.load(s_qs + q, mask=m, other=0).to(tl.float32), tl.load(s_qz + q, mask=m, other=0)
            scale = s2 * (sc - z2.to(tl.float32))
            zc = _stat(zcode, OUT * QZ_BITS // 32, g, r, m, QZ_BITS)
            s2, z2 = tl.load(z_qs + q, mask=m, other=0).to(tl.float32), tl.load(z_qz + q, mask=m, other=0)
            zero = s2 * (zc - z2.to(tl.float32))
        else:
            scale = tl.load(s_qs + g[None, :] * OUT + r[:, None], mask=m, other=0).to(tl.float32)
            zero = _stat(qzeros, OUT * BITS // 32, g, r, m, BITS)
        w = scale * (code - zero)
        col = tl.load(perm + j, mask=jmask, other=0)
        if MATVEC:
            xv = tl.load(x + col, mask=jmask, other=0).to(tl.float32)
            acc += tl.sum(tl.where(m, w * xv[None, :], 0.0), axis=1)
        else:
            tl.store(out + r[:, None].to(tl.int64) * IN + col[None, :], w, mask=m)
    if MATVEC:
        tl.store(out + r, acc, mask=rmask)


@triton.jit
def outlier_kernel(row_ptr, col, val, x, out, OUT, IN, MATVEC: tl.constexpr,
                   BLOCK_OUT: tl.constexpr, BLOCK_NNZ: tl.constexpr):
    """CSR outliers: out[r, col] += val (MATVEC=False) or out[r] += sum val * x[col]."""
    r = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    rmask = r < OUT
    start = tl.load(row_ptr + r, mask=rmask, other=0)
    end = tl.load(row_ptr + r + 1, mask=rmask, other=0)
    acc = tl.zeros((BLOCK_OUT,), dtype=tl.float32)
    for k0 in range(0, tl.max(end - start, axis=0), BLOCK_NNZ):
        idx = start[:, None] + k0 + tl.arange(0, BLOCK_NNZ)[None, :]
        m = idx < end[:, None]
        c = tl.load(col + idx, mask=m, other=0).to(tl.int32) & 0xFFFF  # uint16 bit pattern
        v = tl.load(val + idx, mask=m, other=0).to(tl.float32)
        if MATVEC:
            acc += tl.sum(v * tl.load(x + c, mask=m, other=0).to(tl.float32), axis=1)
        else:
            ptr = out + r[:, None].to(tl.int64) * IN + c
            tl.store(ptr, tl.load(ptr, mask=m, other=0) + v, mask=m)
    if MATVEC:
        tl.store(out + r, tl.load(out + r, mask=rmask, other=0) + acc, mask=rmask)
