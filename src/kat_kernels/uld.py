"""Fused ULD loss in Triton: exact sorted-L1 by a per-row stable radix sort, gradient computed in the forward.

Public API (mirrors :mod:`kat.losses.uld`, the oracle; this module imports only torch and triton):

* ``uld_loss(student_logits, teacher_logits, *, student_temperature=1.0, teacher_temperature=1.0, mask=None,
  reduction="mean")``
* ``uld_loss_topk(student_logits, teacher_topk_logprobs, teacher_tail_mass, *, student_temperature=1.0,
  mask=None, reduction="mean")``  (top-k + tail bucket against an offline teacher cache)

The fused linear + ULD loss (``fused_linear_uld_loss``: student hidden states and the output head in, student
logits never beyond one chunk of rows) is in :mod:`kat_kernels.fused_linear_uld`, on top of this module's
row engine (:func:`_uld_rows`) and argument checks.

Method (docs/uld.md has the derivation and the measurements behind the choice)
-------------------------------------------------------------------------------
ULD per row is Σ_r |s_(r) − t_(r)| over the two probability vectors sorted descending (the shorter one
zero-padded). Softmax is monotone, so sorting probabilities equals sorting logits. Each row of each side is
sorted *exactly* by an LSD radix sort over a monotone integer key of the raw logit bits (16-bit keys for
bf16/fp16 inputs: 4 passes of 4 bits; 32-bit keys for fp32: 8 passes). A pass is three kernels: a per-tile
digit histogram, a per-row offset scan, and a stable scatter whose in-tile ranks come from a one-hot
cumulative sum (no ``tl.sort``, no atomics: deterministic, and fast under ``TRITON_INTERPRET=1``).
With both sides sorted, one kernel walks the ranks (loss, ⟨p, g⟩ partial sums, g_r = sign(s_(r) − t_(r))) and
a second one writes the gradient ``dz_j = p_j (g_j − ⟨p, g⟩) / τ_S`` back to each student column j through
the sorted index (the gradient of the softmax composed with the sorted L1; 0 at exact ties, like
``torch.abs``). Rows are processed in chunks so that the sort scratch stays below ``SCRATCH_BYTES``; no
N×V softmax, sort or index tensor is ever allocated. The histogram estimator of docs/uld.md §4.1
was evaluated first and rejected: it fails the accuracy contract on flat or near-identical rows (see docs).

Memory: the forward allocates the student-logit gradient (N × V_S, the student dtype) when the student
requires grad (the Liger pattern: backward only multiplies by ``grad_output``), plus ``SCRATCH_BYTES`` of
sort scratch at most (12-16 B per student column and 4-8 B per teacher column per row in flight).

Kernels never fall back to torch: CPU tensors are refused unless the module was imported with
``TRITON_INTERPRET=1`` (the Triton interpreter, used by the CPU test suite).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.standard import _elementwise_max as _max_combine
from triton.language.standard import _sum_combine

__all__ = ["uld_loss", "uld_loss_topk", "SCRATCH_BYTES", "is_interpreted"]

#: Upper bound (bytes) for the per-chunk radix-sort scratch; rows are processed in chunks that fit it.
SCRATCH_BYTES = 512 * 1024 * 1024

_RADIX_BITS = 4
_NDIGITS = 1 << _RADIX_BITS
_SORT_TILE = 512  # sort kernels hold (16, TILE) int32 one-hot tensors: keep them in registers
_RANK_TILE = 1024
_INTERPRETER_TILE = 4096
_INT_MIN = tl.constexpr(-2147483648)
_REDUCTIONS = ("mean", "sum", "none")
_FLOAT16_CODE = {torch.bfloat16: 0, torch.float16: 1}


# ----------------------------------------------------------------------------------------------------------
# Triton kernels
#
# Helpers are written inline and reductions call ``tl.reduce``/``tl.associative_scan`` with the standard
# combine functions directly: under TRITON_INTERPRET=1 every nested @jit call (tl.sum, tl.cumsum and our own
# helpers included) re-patches the language module (~0.3 ms each), which dominated the CPU test time.
#
# Sort keys: x -> integer whose *unsigned* order is the descending order of x.
#   16-bit floats: asc = bits ^ 0x8000 if positive else ~bits (16 bits); key = 0xFFFF - asc  (int32 lanes)
#   fp32:          asc = bits ^ 0x80000000 if positive else ~bits;      key = ~asc
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _keys_kernel(x_ptr, x_stride, keep_ptr, row0, ncols, temperature,
                 key_ptr, idx_ptr, scratch_stride, stats_ptr, hist_ptr, ntiles,
                 KEY16: tl.constexpr, WITH_IDX: tl.constexpr, NDIG: tl.constexpr, TILE: tl.constexpr):
    """Per (row, tile): write sort keys (+ column index), tile (max, Σexp) of x/τ and the digit-0 histogram."""
    r = tl.program_id(0)
    t = tl.program_id(1)
    grow = row0 + r
    keep = tl.load(keep_ptr + grow)
    if keep != 0:
        cols = t * TILE + tl.arange(0, TILE)
        valid = cols < ncols
        x = tl.load(x_ptr + grow.to(tl.int64) * x_stride + cols, mask=valid, other=0.0)
        soffs = r.to(tl.int64) * scratch_stride + cols
        if KEY16:
            bits = x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            asc = tl.where((bits & 0x8000) != 0, (~bits) & 0xFFFF, bits | 0x8000)
            key = 0xFFFF - asc
            tl.store(key_ptr + soffs, key.to(tl.int16), mask=valid)
        else:
            bits = x.to(tl.int32, bitcast=True)
            asc = tl.where(bits < 0, ~bits, bits ^ _INT_MIN)
            key = ~asc
            tl.store(key_ptr + soffs, key, mask=valid)
        if WITH_IDX:
            tl.store(idx_ptr + soffs, cols, mask=valid)
        z = tl.where(valid, x.to(tl.float32) / temperature, float("-inf"))
        zmax = tl.reduce(z, 0, _max_combine)
        zsum = tl.reduce(tl.exp(z - zmax), 0, _sum_combine)
        tl.store(stats_ptr + (r * ntiles + t) * 2, zmax)
        tl.store(stats_ptr + (r * ntiles + t) * 2 + 1, zsum)
        digits = tl.arange(0, NDIG)
        onehot = (((key & (NDIG - 1))[None, :] == digits[:, None]) & valid[None, :]).to(tl.int32)
        tl.store(hist_ptr + (r * ntiles + t) * NDIG + digits, tl.reduce(onehot, 1, _sum_combine))


@triton.jit
def _hist_kernel(key_ptr, scratch_stride, keep_ptr, row0, ncols, hist_ptr, ntiles, shift,
                 KEY16: tl.constexpr, NDIG: tl.constexpr, TILE: tl.constexpr):
    """Per (row, tile): histogram of the radix digit at ``shift``."""
    r = tl.program_id(0)
    t = tl.program_id(1)
    keep = tl.load(keep_ptr + row0 + r)
    if keep != 0:
        cols = t * TILE + tl.arange(0, TILE)
        valid = cols < ncols
        key = tl.load(key_ptr + r.to(tl.int64) * scratch_stride + cols, mask=valid, other=0)
        if KEY16:
            key = key.to(tl.int32) & 0xFFFF
        digits = tl.arange(0, NDIG)
        onehot = ((((key >> shift) & (NDIG - 1))[None, :] == digits[:, None]) & valid[None, :]).to(tl.int32)
        tl.store(hist_ptr + (r * ntiles + t) * NDIG + digits, tl.reduce(onehot, 1, _sum_combine))


@triton.jit
def _offsets_kernel(hist_ptr, offs_ptr, keep_ptr, row0, ntiles,
                    NDIG: tl.constexpr, TILES_P2: tl.constexpr):
    """Per row: start of (digit d, tile t) in the output = Σ_{d'<d} total[d'] + Σ_{t'<t} hist[t', d]."""
    r = tl.program_id(0)
    keep = tl.load(keep_ptr + row0 + r)
    if keep != 0:
        tiles = tl.arange(0, TILES_P2)
        digits = tl.arange(0, NDIG)
        offs = (r * ntiles + tiles[None, :]) * NDIG + digits[:, None]  # (NDIG, TILES_P2)
        valid = (digits < NDIG)[:, None] & (tiles < ntiles)[None, :]
        h = tl.load(hist_ptr + offs, mask=valid, other=0)
        tile_prefix = tl.associative_scan(h, 1, _sum_combine) - h
        totals = tl.reduce(h, 1, _sum_combine)  # (NDIG,)
        digit_base = tl.associative_scan(totals, 0, _sum_combine) - totals
        tl.store(offs_ptr + offs, tile_prefix + digit_base[:, None], mask=valid)


@triton.jit
def _scatter_kernel(src_key_ptr, src_idx_ptr, dst_key_ptr, dst_idx_ptr, scratch_stride, keep_ptr, row0,
                    ncols, offs_ptr, ntiles, shift,
                    KEY16: tl.constexpr, WITH_IDX: tl.constexpr, NDIG: tl.constexpr, TILE: tl.constexpr):
    """Per (row, tile): stable scatter of keys (+ indices) to their position for this radix digit."""
    r = tl.program_id(0)
    t = tl.program_id(1)
    keep = tl.load(keep_ptr + row0 + r)
    if keep != 0:
        cols = t * TILE + tl.arange(0, TILE)
        valid = cols < ncols
        row_off = r.to(tl.int64) * scratch_stride
        raw = tl.load(src_key_ptr + row_off + cols, mask=valid, other=0)
        if KEY16:
            key = raw.to(tl.int32) & 0xFFFF
        else:
            key = raw
        digits = tl.arange(0, NDIG)
        onehot = ((((key >> shift) & (NDIG - 1))[None, :] == digits[:, None]) & valid[None, :]).to(tl.int32)
        before = tl.associative_scan(onehot, 1, _sum_combine) - onehot  # same-digit lanes before this one
        base = tl.load(offs_ptr + (r * ntiles + t) * NDIG + digits)  # (NDIG,)
        pos = tl.reduce(onehot * (before + base[:, None]), 0, _sum_combine)  # (TILE,)
        tl.store(dst_key_ptr + row_off + pos, raw, mask=valid)
        if WITH_IDX:
            idx = tl.load(src_idx_ptr + row_off + cols, mask=valid, other=0)
            tl.store(dst_idx_ptr + row_off + pos, idx, mask=valid)


@triton.jit
def _rank_kernel(skey_ptr, sidx_ptr, tkey_ptr, s_stride, t_stride, keep_ptr, row0, vs, vt, head_len,
                 s_stats_ptr, t_stats_ptr, s_temp, t_temp, part_ptr, ntiles, row_ptr, dz_ptr, dz_stride,
                 S_KEY16: tl.constexpr, S_F16: tl.constexpr, T_KEY16: tl.constexpr, T_F16: tl.constexpr,
                 T_LOGPROB: tl.constexpr, WRITE_GRAD: tl.constexpr, TILE: tl.constexpr):
    """Per (row, rank tile) over the sorted rows.

    WRITE_GRAD=False: partial sums Σ_{r<head}|p_S − p_T|, Σ_{r<head} p_S·sign(p_S − p_T), Σ_{r≥head} p_S.
    WRITE_GRAD=True:  dz[row, idx_r] = p_r (g_r − ⟨p, g⟩) · coef / τ_S with g_r = sign(p_S − p_T) for r < head
                      and g_tail beyond; row_ptr holds (⟨p, g⟩, g_tail, coef) per row. Masked rows get zeros.
    p at rank r: student exp(z_(r)/τ_S − max)/Σ (0 for r ≥ V_S); teacher likewise (0 for r ≥ V_T), or
    exp(logprob_(r)) for a top-k cache (T_LOGPROB).
    """
    r = tl.program_id(0)
    t = tl.program_id(1)
    grow = row0 + r
    keep = tl.load(keep_ptr + grow)
    ranks = t * TILE + tl.arange(0, TILE)
    in_s = ranks < vs
    if keep != 0:
        in_t = ranks < vt
        ks = tl.load(skey_ptr + r.to(tl.int64) * s_stride + ranks, mask=in_s, other=0)
        if S_KEY16:
            asc = 0xFFFF - (ks.to(tl.int32) & 0xFFFF)
            b16 = tl.where((asc & 0x8000) != 0, asc & 0x7FFF, (~asc) & 0xFFFF).to(tl.int16)
            if S_F16 == 0:
                zs = b16.to(tl.bfloat16, bitcast=True).to(tl.float32)
            else:
                zs = b16.to(tl.float16, bitcast=True).to(tl.float32)
        else:
            asc = ~ks
            zs = tl.where(asc < 0, asc ^ _INT_MIN, ~asc).to(tl.float32, bitcast=True)
        ps = tl.where(in_s, tl.exp(zs / s_temp - tl.load(s_stats_ptr + 2 * r)) / tl.load(s_stats_ptr + 2 * r + 1),
                      0.0)
        kt = tl.load(tkey_ptr + r.to(tl.int64) * t_stride + ranks, mask=in_t, other=0)
        if T_KEY16:
            asc_t = 0xFFFF - (kt.to(tl.int32) & 0xFFFF)
            b16_t = tl.where((asc_t & 0x8000) != 0, asc_t & 0x7FFF, (~asc_t) & 0xFFFF).to(tl.int16)
            if T_F16 == 0:
                zt = b16_t.to(tl.bfloat16, bitcast=True).to(tl.float32)
            else:
                zt = b16_t.to(tl.float16, bitcast=True).to(tl.float32)
        else:
            asc_t = ~kt
            zt = tl.where(asc_t < 0, asc_t ^ _INT_MIN, ~asc_t).to(tl.float32, bitcast=True)
        if T_LOGPROB:
            pt = tl.where(in_t, tl.exp(zt), 0.0)
        else:
            pt = tl.where(in_t, tl.exp(zt / t_temp - tl.load(t_stats_ptr + 2 * r))
                          / tl.load(t_stats_ptr + 2 * r + 1), 0.0)
        diff = ps - pt
        sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
        head = ranks < head_len
        if WRITE_GRAD:
            g = tl.where(head, sign, tl.load(row_ptr + 3 * r + 1))
            dz = ps * (g - tl.load(row_ptr + 3 * r)) * (tl.load(row_ptr + 3 * r + 2) / s_temp)
            idx = tl.load(sidx_ptr + r.to(tl.int64) * s_stride + ranks, mask=in_s, other=0)
            tl.store(dz_ptr + grow.to(tl.int64) * dz_stride + idx, dz.to(dz_ptr.dtype.element_ty), mask=in_s)
        else:
            base = (r * ntiles + t) * 3
            tl.store(part_ptr + base, tl.reduce(tl.where(head, tl.abs(diff), 0.0), 0, _sum_combine))
            tl.store(part_ptr + base + 1, tl.reduce(tl.where(head, ps * sign, 0.0), 0, _sum_combine))
            tl.store(part_ptr + base + 2, tl.reduce(tl.where(head, 0.0, ps), 0, _sum_combine))
    else:
        if WRITE_GRAD:
            zero = tl.zeros([TILE], dtype=tl.float32).to(dz_ptr.dtype.element_ty)
            tl.store(dz_ptr + grow.to(tl.int64) * dz_stride + ranks, zero, mask=in_s)


# ----------------------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------------------
def is_interpreted() -> bool:
    """True when the kernels were built for the Triton interpreter (TRITON_INTERPRET=1 at import time)."""
    return type(_keys_kernel).__name__ == "InterpretedFunction"


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _tile_for(width: int, gpu_max: int) -> int:
    """Columns per program: ``gpu_max`` on GPU; _INTERPRETER_TILE under the interpreter (cost per program/op)."""
    return min(_INTERPRETER_TILE if is_interpreted() else gpu_max, max(16, _next_pow2(width)))


def _check_device(name: str, x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not is_interpreted():
        raise RuntimeError(f"kat_kernels.uld: {name} is on {x.device}; the Triton kernels need CUDA tensors "
                           f"(CPU tensors only work when TRITON_INTERPRET=1 was set before importing "
                           f"kat_kernels.uld). There is no silent fallback: use kat.losses.uld instead.")


def _check_2d_float(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape [N, V], got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} must have a non-empty last dimension, got {tuple(x.shape)}")
    if x.shape[1] >= 2**31 - 4096:
        raise ValueError(f"{name} has too many columns ({x.shape[1]})")
    _check_device(name, x)


def _check_temperature(name: str, value: float) -> float:
    value = float(value)
    if not (value > 0.0) or value == float("inf"):
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
    return value


def _check_mask(mask: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor of shape [{n}], got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != (n,):
        raise ValueError(f"mask must have shape [{n}], got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask is on {mask.device} but the logits are on {device}")
    return mask


def _check_reduction(reduction: str, allowed=_REDUCTIONS) -> None:
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {reduction!r}")


class _Side:
    """Sort scratch and metadata for one side (student or teacher) of a row chunk."""

    def __init__(self, x: torch.Tensor, rows: int, with_idx: bool):
        self.width = x.shape[1]
        self.key16 = x.dtype in _FLOAT16_CODE
        self.f16 = _FLOAT16_CODE.get(x.dtype, 0)
        self.passes = (16 if self.key16 else 32) // _RADIX_BITS
        self.tile = _tile_for(self.width, _SORT_TILE)
        self.ntiles = triton.cdiv(self.width, self.tile)
        self.tiles_p2 = _next_pow2(self.ntiles)
        # (16, TILES_P2) int32 scans: keep them in registers (ptxas -v, sm_90: no spills up to 512 tiles)
        self.offsets_warps = 4 if self.tiles_p2 <= 128 else (8 if self.tiles_p2 <= 256 else 16)
        dev = x.device
        kdt = torch.int16 if self.key16 else torch.int32
        self.keys = [torch.empty(rows, self.width, dtype=kdt, device=dev) for _ in range(2)]
        self.idx = [torch.empty(rows, self.width, dtype=torch.int32, device=dev) for _ in range(2)] \
            if with_idx else [self.keys[0], self.keys[1]]  # dummies, never touched when with_idx is False
        self.with_idx = with_idx
        self.stats = torch.zeros(rows, self.ntiles, 2, dtype=torch.float32, device=dev)
        self.hist = torch.zeros(rows, self.ntiles, _NDIGITS, dtype=torch.int32, device=dev)
        self.offs = torch.zeros_like(self.hist)
        self.row_stats = torch.zeros(rows, 2, dtype=torch.float32, device=dev)  # (max of x/τ, Σ exp) per row

    @staticmethod
    def scratch_bytes_per_row(width: int, dtype: torch.dtype, with_idx: bool) -> int:
        kb = 2 if dtype in _FLOAT16_CODE else 4
        return width * 2 * (kb + (4 if with_idx else 0))

    def sort(self, x: torch.Tensor, keep: torch.Tensor, row0: int, rows: int, temperature: float) -> None:
        """Sort ``rows`` rows of x starting at ``row0`` (descending); result in keys[0] (and idx[0])."""
        grid = (rows, self.ntiles)
        self.stats.zero_()
        _keys_kernel[grid](x, x.stride(0), keep, row0, self.width, temperature,
                           self.keys[0], self.idx[0], self.width, self.stats, self.hist, self.ntiles,
                           KEY16=self.key16, WITH_IDX=self.with_idx, NDIG=_NDIGITS, TILE=self.tile,
                           num_warps=4)
        src = 0
        for p in range(self.passes):
            shift = p * _RADIX_BITS
            if p > 0:
                _hist_kernel[grid](self.keys[src], self.width, keep, row0, self.width, self.hist, self.ntiles,
                                   shift, KEY16=self.key16, NDIG=_NDIGITS, TILE=self.tile, num_warps=4)
            _offsets_kernel[(rows,)](self.hist, self.offs, keep, row0, self.ntiles, NDIG=_NDIGITS,
                                     TILES_P2=self.tiles_p2, num_warps=self.offsets_warps)
            _scatter_kernel[grid](self.keys[src], self.idx[src], self.keys[1 - src], self.idx[1 - src],
                                  self.width, keep, row0, self.width, self.offs, self.ntiles, shift,
                                  KEY16=self.key16, WITH_IDX=self.with_idx, NDIG=_NDIGITS, TILE=self.tile,
                                  num_warps=8)
            src = 1 - src
        assert src == 0, "an even number of radix passes leaves the result in buffer 0"
        st = self.stats[:rows]
        zmax = st[..., 0].amax(dim=1)  # (rows,)
        zsum = (st[..., 1] * torch.exp(st[..., 0] - zmax[:, None])).sum(dim=1)  # (rows,)
        self.row_stats[:rows, 0] = zmax
        self.row_stats[:rows, 1] = zsum


def _uld_rows(student: torch.Tensor, teacher: torch.Tensor, keep: torch.Tensor, *, tau_s: float, tau_t: float,
              teacher_logprob: bool, tail_t: torch.Tensor | None, coef: torch.Tensor | None,
              dz: torch.Tensor | None, max_rows: int | None = None) -> torch.Tensor:
    """Per-row ULD (N,) fp32 for the selected rows (``keep`` int8 (N,)); writes dz (N, V_S) when given.

    teacher: (N, V_T) logits, or (N, k) natural-log probabilities when ``teacher_logprob`` (then the loss is
    the top-k + tail form with the teacher tail ``tail_t`` (N,)). coef: (N,) fp32 gradient scale per row.
    """
    n, vs = student.shape
    vt = teacher.shape[1]
    dev = student.device
    per_row_bytes = (_Side.scratch_bytes_per_row(vs, student.dtype, True)
                     + _Side.scratch_bytes_per_row(vt, teacher.dtype, False))
    rows = max(1, min(n, SCRATCH_BYTES // max(1, per_row_bytes)))
    if max_rows is not None:
        rows = max(1, min(rows, max_rows))
    s_side = _Side(student, rows, with_idx=True)
    t_side = _Side(teacher, rows, with_idx=False)
    head_len = vt if teacher_logprob else max(vs, vt)
    length = max(vs, vt)
    rank_tile = _tile_for(length, _RANK_TILE)
    s_grad_tile = _tile_for(vs, _RANK_TILE)
    n_rank_tiles = triton.cdiv(length, rank_tile)
    parts = torch.zeros(rows, n_rank_tiles, 3, dtype=torch.float32, device=dev)
    row_info = torch.zeros(rows, 3, dtype=torch.float32, device=dev)
    loss = torch.zeros(n, dtype=torch.float32, device=dev)
    flags = dict(S_KEY16=s_side.key16, S_F16=s_side.f16, T_KEY16=t_side.key16, T_F16=t_side.f16,
                 T_LOGPROB=teacher_logprob)
    for row0 in range(0, n, rows):
        cnt = min(rows, n - row0)
        s_side.sort(student, keep, row0, cnt, tau_s)
        t_side.sort(teacher, keep, row0, cnt, 1.0 if teacher_logprob else tau_t)
        parts.zero_()
        _rank_kernel[(cnt, n_rank_tiles)](
            s_side.keys[0], s_side.idx[0], t_side.keys[0], vs, vt, keep, row0, vs, vt, head_len,
            s_side.row_stats, t_side.row_stats, tau_s, tau_t, parts, n_rank_tiles, row_info, parts, 0,
            WRITE_GRAD=False, TILE=rank_tile, num_warps=4, **flags)
        sums = parts[:cnt].sum(dim=1)  # (cnt, 3)
        if teacher_logprob:
            tail_gap = sums[:, 2] - tail_t[row0:row0 + cnt]  # (cnt,)
            loss[row0:row0 + cnt] = sums[:, 0] + tail_gap.abs()
            g_tail = torch.sign(tail_gap)
        else:
            loss[row0:row0 + cnt] = sums[:, 0]
            g_tail = torch.zeros_like(sums[:, 0])
        if dz is not None:
            row_info[:cnt, 0] = sums[:, 1] + g_tail * sums[:, 2]  # ⟨p, g⟩
            row_info[:cnt, 1] = g_tail
            row_info[:cnt, 2] = coef[row0:row0 + cnt]
            _rank_kernel[(cnt, triton.cdiv(vs, s_grad_tile))](
                s_side.keys[0], s_side.idx[0], t_side.keys[0], vs, vt, keep, row0, vs, vt, head_len,
                s_side.row_stats, t_side.row_stats, tau_s, tau_t, parts, n_rank_tiles, row_info, dz,
                dz.stride(0), WRITE_GRAD=True, TILE=s_grad_tile, num_warps=4, **flags)
    return torch.where(keep.bool(), loss, torch.zeros_like(loss))


def _reduce(per_row: torch.Tensor, n_sel: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total if reduction == "sum" else total / n_sel


def _grad_coef(mask: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(coef (N,) fp32 per-row gradient scale, n_sel () fp32 clamped to ≥ 1) without a host sync."""
    n_sel = mask.sum().clamp_min(1).to(torch.float32)
    if reduction == "mean":
        coef = mask.to(torch.float32) / n_sel
    else:
        coef = mask.to(torch.float32)
    return coef, n_sel


class _ULDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, tail_t, teacher_logprob, tau_s, tau_t, mask, reduction):
        keep = mask.to(torch.int8).contiguous()
        coef, n_sel = _grad_coef(mask, reduction)
        need_grad = ctx.needs_input_grad[0]
        student_c = student.contiguous() if student.stride(1) != 1 else student
        teacher_c = teacher.contiguous() if teacher.stride(1) != 1 else teacher
        dz = torch.empty(student.shape, dtype=student.dtype, device=student.device) if need_grad else None
        per_row = _uld_rows(student_c, teacher_c.detach(), keep, tau_s=tau_s, tau_t=tau_t,
                            teacher_logprob=teacher_logprob, tail_t=tail_t, coef=coef, dz=dz)
        ctx.reduction = reduction
        ctx.used = False
        if need_grad:
            ctx.save_for_backward(dz)
        return _reduce(per_row, n_sel, reduction)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.used:
            raise RuntimeError("kat_kernels.uld: backward through the same ULD call twice is not supported "
                               "(the stored gradient is scaled in place)")
        ctx.used = True
        (dz,) = ctx.saved_tensors
        if ctx.reduction == "none":
            dz.mul_(grad_output.to(dz.dtype)[:, None])
        else:
            dz.mul_(grad_output.to(dz.dtype))
        return dz, None, None, None, None, None, None, None


def uld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    student_temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Exact ULD, same contract as :func:`kat.losses.uld.uld_loss` (fp32 result; gradient to the student only).

    Args:
        student_logits: (N, V_S) float32/bfloat16/float16 CUDA tensor.
        teacher_logits: (N, V_T) float32/bfloat16/float16, same device; never receives a gradient.
        student_temperature, teacher_temperature: τ > 0.
        mask: optional (N,) bool row selection.
        reduction: "mean" over selected rows (0 rows -> 0), "sum", or "none" -> (N,) with masked rows 0.
    """
    _check_2d_float("student_logits", student_logits)
    _check_2d_float("teacher_logits", teacher_logits)
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ValueError(f"student_logits and teacher_logits must have the same number of rows, got "
                         f"{student_logits.shape[0]} and {teacher_logits.shape[0]}")
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"student_logits is on {student_logits.device} but teacher_logits is on "
                         f"{teacher_logits.device}")
    tau_s = _check_temperature("student_temperature", student_temperature)
    tau_t = _check_temperature("teacher_temperature", teacher_temperature)
    _check_reduction(reduction)
    mask = _check_mask(mask, student_logits.shape[0], student_logits.device)
    return _ULDFunction.apply(student_logits, teacher_logits, None, False, tau_s, tau_t, mask, reduction)


def _check_topk(student_logits, teacher_topk_logprobs, teacher_tail_mass) -> torch.Tensor:
    """Validate the top-k cache inputs; return the teacher tail (N,) fp32."""
    _check_2d_float("teacher_topk_logprobs", teacher_topk_logprobs)
    n = teacher_topk_logprobs.shape[0]
    if student_logits.shape[0] != n:
        raise ValueError(f"the student and teacher_topk_logprobs must have the same number of rows, got "
                         f"{student_logits.shape[0]} and {n}")
    if student_logits.device != teacher_topk_logprobs.device:
        raise ValueError(f"the student is on {student_logits.device} but teacher_topk_logprobs is on "
                         f"{teacher_topk_logprobs.device}")
    if teacher_tail_mass is None:
        return (1.0 - teacher_topk_logprobs.detach().float().exp().sum(dim=-1)).clamp(0.0, 1.0)
    if not isinstance(teacher_tail_mass, torch.Tensor) or teacher_tail_mass.shape != (n,):
        raise ValueError(f"teacher_tail_mass must be a tensor of shape [{n}], got "
                         f"{tuple(getattr(teacher_tail_mass, 'shape', ()))}")
    if not teacher_tail_mass.is_floating_point():
        raise TypeError(f"teacher_tail_mass must be floating point, got {teacher_tail_mass.dtype}")
    return teacher_tail_mass.detach().to(device=student_logits.device, dtype=torch.float32)


def uld_loss_topk(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_tail_mass: torch.Tensor | None,
    *,
    student_temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Top-k + tail-bucket ULD, same contract as :func:`kat.losses.uld.uld_loss_topk`.

    Per row Σ_{r≤k}|a_r − b_r| + |τ_S − τ_T|; here τ_S = Σ_{r>k} a_r is summed directly (the reference uses
    1 − Σ_{r≤k} a_r; they differ by fp32 rounding only).
    """
    _check_2d_float("student_logits", student_logits)
    tail_t = _check_topk(student_logits, teacher_topk_logprobs, teacher_tail_mass)
    tau_s = _check_temperature("student_temperature", student_temperature)
    _check_reduction(reduction)
    mask = _check_mask(mask, student_logits.shape[0], student_logits.device)
    return _ULDFunction.apply(student_logits, teacher_topk_logprobs, tail_t, True, tau_s, 1.0, mask, reduction)
