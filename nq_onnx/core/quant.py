"""Numpy reference of the quantizers that the emitted QDQ graph implements, bit for bit.

Symmetric b-bit quantization with step (scale) ``s``::

    q(x) = clip(round_half_even(x / s), -2^(b-1), 2^(b-1) - 1)        dq(q) = s * q

Weights are quantized per output channel; with the MinMax step ``s_c = max|W_c| / (2^(b-1) - 1)`` their
codes fall in the narrow range ``[-(2^(b-1) - 1), 2^(b-1) - 1]``, and a searched (smaller) step saturates at
``[-2^(b-1), 2^(b-1) - 1]``. Activations are quantized per tensor and stored as uint8 with zero point 128
(``u = q + 128``): the same numbers as int8 codes with zero point 0.

Weight codes are stored as int8 (zero point 0) or as uint8 with zero point 128 (``v = q + 128``, the same
numbers). The container decides onnxruntime's CPU kernel: uint8 x int8 ("U8S8") on x86 without VNNI sums two
neighbouring ``u * w`` products into a saturating int16, uint8 x uint8 ("U8U8") does not (:mod:`nq_onnx.io.cpu`).
:func:`pair_sum_bound` bounds the pair sums from the codes alone, so a layer is stored int8 only where no pair
can pass ``2^15 - 1`` for any input.

The kernel's pairs are not any two products: onnxruntime's MLAS packs B for its U8S8 kernels without VNNI (AVX2,
AVX-512 core, the GEMV and SSE4.1 paths) by interleaving four consecutive rows of ``K`` per output column, and
``vpmaddubsw`` adds the products of rows ``(2i, 2i + 1)``; its ``K`` blocks start at multiples of 4 and the tail is
padded with zeros. Against uint8 activations (``a <= 255``) such a pair cannot saturate when
``|q_2i| + |q_2i+1| <= 128`` (``255 * 128 = 32640 < 2^15``). :func:`limit_pairs` keeps 8-bit codes inside that
bound (``int8-paired`` storage), :func:`kernel_pair_sum_bound` checks it: an int8 weight whose kernel pairs
obey it is exact on every CPU with nearly 8 bits of resolution, where codes in ``+-63`` (7 bits) obey it for any
pairing.

A tensor that calibration shows to be non-negative (softmax probabilities, post-ReLU) is quantized
*unsigned*, still scale-only (zero point 0): ``q(x) = clip(round(x / s), 0, 2^b - 1)``, which spends no code
on a sign it never has (one bit more resolution for the attention ``A V`` input).
"""

from __future__ import annotations

import numpy as np

ACT_ZERO_POINT = 128


def asymmetric_zero_point(low: float, scale: float, bits: int) -> int:
    """The zero point ``z = min(2^b - 1, rint(-low / s))`` of an asymmetric quantizer anchored at ``low <= 0``
    (float32 maths, as the simulation's ``Round(Div(-low, s))``): its codes ``[-z, 2^b - 1 - z]`` cover
    ``[low, (2^b - 1 - z) s]`` up to half a step."""
    z = np.rint(np.divide(np.float32(-low), np.float32(scale), dtype=np.float32))
    return int(min(2**bits - 1, max(0.0, float(z))))


def rounded_codes(x: np.ndarray, scale: float, lo: int, hi: int) -> np.ndarray:
    """``clip(rint(x / s), lo, hi)`` as float32, for any code range (an asymmetric quantizer's)."""
    out = np.divide(np.asarray(x, dtype=np.float32), np.float32(scale), dtype=np.float32)
    np.rint(out, out=out)
    np.clip(out, lo, hi, out=out)
    return out


def fake_quant_codes(x: np.ndarray, scale: float, lo: int, hi: int) -> np.ndarray:
    """``s * clip(rint(x / s), lo, hi)`` in float32 (:func:`rounded_codes` times the step)."""
    out = rounded_codes(x, scale, lo, hi)
    out *= np.float32(scale)
    return out


def code_range(bits: int, signed: bool = True) -> tuple[int, int]:
    """Code range of a ``bits``-bit quantizer: ``[-2^(b-1), 2^(b-1) - 1]``, or ``[0, 2^b - 1]`` unsigned."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def zero_point(signed: bool) -> int:
    """The uint8 zero point that stores codes of a signed (128) or unsigned (0) activation quantizer."""
    return ACT_ZERO_POINT if signed else 0


def stored_code_range(bits: int, signed: bool = True) -> tuple[int, int]:
    """The uint8 values an activation quantizer can store: its code range plus its zero point."""
    lo, hi = code_range(bits, signed)
    zp = zero_point(signed)
    return lo + zp, hi + zp


def qmax(bits: int) -> int:
    """Largest symmetric code ``2^(b-1) - 1``."""
    return 2 ** (bits - 1) - 1


def quantize(x: np.ndarray, scale: np.ndarray | float, bits: int, signed: bool = True) -> np.ndarray:
    """Integer codes of ``x`` (float32 maths, ties to even, saturated to the b-bit range)."""
    return _rounded(x, scale, bits, signed).astype(np.int32)


def fake_quant(x: np.ndarray, scale: np.ndarray | float, bits: int, signed: bool = True) -> np.ndarray:
    """``dq(q(x))`` in float32 (the codes are exact in float32, so this equals ``quantize(...) * scale``)."""
    out = _rounded(x, scale, bits, signed)
    out *= np.asarray(scale, dtype=np.float32)
    return out


def _rounded(x: np.ndarray, scale: np.ndarray | float, bits: int, signed: bool) -> np.ndarray:
    """``clip(rint(x / scale), lo, hi)`` as float32, in one new array (weights can be hundreds of MB)."""
    lo, hi = code_range(bits, signed)
    out = np.divide(np.asarray(x, dtype=np.float32), np.asarray(scale, dtype=np.float32), dtype=np.float32)
    np.rint(out, out=out)
    np.clip(out, lo, hi, out=out)
    return out


def minmax_scale(absmax: np.ndarray | float, bits: int, signed: bool = True) -> np.ndarray:
    """MinMax step ``max|x| / (2^(b-1) - 1)`` (``/ (2^b - 1)`` unsigned); an all-zero channel gets step 1."""
    absmax = np.asarray(absmax, dtype=np.float32)
    scale = absmax / np.float32(qmax(bits) if signed else code_range(bits, False)[1])
    return np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)


def weight_scales(w: np.ndarray, axis: int, bits: int) -> np.ndarray:
    """Per-output-channel MinMax steps of a 2-D weight whose output channels lie along ``axis``."""
    reduce_axis = 1 - axis
    return minmax_scale(np.abs(w).max(axis=reduce_axis), bits)


def quantize_weight(w: np.ndarray, scales: np.ndarray, axis: int, bits: int) -> np.ndarray:
    """Per-channel integer codes of a 2-D weight (channels along ``axis``), as int8."""
    shape = [1, 1]
    shape[axis] = -1
    return quantize(w, scales.reshape(shape), bits).astype(np.int8)


INT16_MAX = 2**15 - 1


def pair_sum_bound(codes_kn: np.ndarray, act_lo: int, act_hi: int) -> np.ndarray:
    """Per output channel, the largest ``|a_i w_i + a_j w_j|`` over any two input channels ``i != j`` of the
    ``[K, N]`` weight codes ``w`` and any stored activation codes ``a`` in ``[act_lo, act_hi]``.

    ``vpmaddubsw`` saturates such a sum at ``2^15 - 1``. The bound takes the two largest (and the two most
    negative) terms ``max_a a w_i`` of the column, whatever pairs the kernel packs together, so it holds for
    any packing of ``K``. With ``a >= 0`` the extreme of ``a w`` is at ``act_lo`` or ``act_hi``.
    """
    w = np.asarray(codes_kn, dtype=np.int64)
    high, low = _product_extremes(w, act_lo, act_hi)
    if w.shape[0] < 2:
        return np.maximum(np.abs(high), np.abs(low)).max(axis=0)
    top = -np.partition(-high, 1, axis=0)[:2].sum(axis=0)
    bottom = np.partition(low, 1, axis=0)[:2].sum(axis=0)
    return np.maximum(top, -bottom)


KERNEL_PAIR_LIMIT = INT16_MAX // 255  # 128: the largest |q_2i| + |q_2i+1| no uint8 activation can saturate


def _product_extremes(w: np.ndarray, act_lo: int, act_hi: int) -> tuple[np.ndarray, np.ndarray]:
    """The largest and smallest ``a w`` per code for activation codes ``a`` in ``[act_lo, act_hi]``, ``a >= 0``
    (the extremes lie at the range's ends)."""
    return np.maximum(w * act_lo, w * act_hi), np.minimum(w * act_lo, w * act_hi)


def _kernel_pairs(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``2i`` and ``2i + 1`` of a ``[K, N]`` array, an odd ``K``'s last row paired with zeros (as MLAS pads)."""
    if rows.shape[0] % 2:
        rows = np.concatenate([rows, np.zeros((1, rows.shape[1]), rows.dtype)])
    return rows[0::2], rows[1::2]


def kernel_pair_sum_bound(codes_kn: np.ndarray, act_lo: int, act_hi: int) -> np.ndarray:
    """Per output channel, the largest ``|a_2i w_2i + a_2i+1 w_2i+1|`` over the pairs of rows ``(2i, 2i + 1)`` that
    the U8S8 kernel adds into one int16 (module docstring), for activation codes in ``[act_lo, act_hi]``, ``a >= 0``
    (an odd ``K``'s last row pairs with a zero)."""
    even, odd = _kernel_pairs(np.asarray(codes_kn, dtype=np.int64))
    (high_even, low_even), (high_odd, low_odd) = (_product_extremes(w, act_lo, act_hi) for w in (even, odd))
    top = (high_even + high_odd).max(axis=0, initial=0)
    bottom = (low_even + low_odd).min(axis=0, initial=0)
    return np.maximum(top, -bottom)


def pair_scales(w_kn: np.ndarray, bits: int, limit: int) -> np.ndarray:
    """Per-output-channel MinMax steps of a ``[K, N]`` weight whose codes must also keep ``|q_2i| + |q_2i+1| <=
    limit``: ``s_c = max(max|W_c| / (2^(b-1) - 1), max_i (|W_2i,c| + |W_2i+1,c|) / (limit - 1))``. Nearest rounding
    adds at most one to a pair's sum, so at this step no code is clipped and no pair passes the limit."""
    a = np.abs(np.asarray(w_kn, dtype=np.float32))
    even, odd = _kernel_pairs(a)
    pairs = (even + odd).max(axis=0)
    return np.maximum(minmax_scale(a.max(axis=0), bits), pairs / np.float32(limit - 1)).astype(np.float32)


def limit_pairs(codes_kn: np.ndarray, limit: int) -> np.ndarray:
    """Codes ``[K, N]`` with every pair of rows ``(2i, 2i + 1)`` brought to ``|q_2i| + |q_2i+1| <= limit`` by the
    nearest codes in the bound: the excess ``e = |q_2i| + |q_2i+1| - limit`` is shared, the smaller magnitude
    losing ``min(its magnitude, floor(e / 2))`` and the larger the rest (the Euclidean projection onto the bound,
    ``|x1| + |x2| <= L``, moves both towards zero by the same amount until one reaches it), so the pair's
    squared error grows by about ``e^2 / 2`` where clipping one code costs ``e^2``; pairs within the bound are
    unchanged."""
    out = np.array(codes_kn, dtype=np.int32)
    even, odd = out[0:out.shape[0] - out.shape[0] % 2:2], out[1::2]
    big_even = np.abs(even) >= np.abs(odd)
    excess = np.maximum(np.abs(even) + np.abs(odd) - limit, 0)
    cut_small = np.minimum(np.minimum(np.abs(even), np.abs(odd)), excess // 2)
    cut_big = excess - cut_small
    even -= np.sign(even) * np.where(big_even, cut_big, cut_small)
    odd -= np.sign(odd) * np.where(big_even, cut_small, cut_big)
    return out.astype(codes_kn.dtype)


def u8s8_safe(codes_kn: np.ndarray, stored: tuple[int, int]) -> bool:
    """Whether int8 codes ``[K, N]`` against activations stored as uint8 in ``stored`` (the activation quantizer's
    :attr:`~nq_onnx.core.quantizers.ActQuantizer.stored_range`) are exact on a U8S8 kernel without VNNI."""
    return bool(pair_sum_bound(codes_kn, *stored).max(initial=0) <= INT16_MAX)


def store_weight(codes: np.ndarray, axis: int, as_uint8: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(stored codes, per-channel zero points)`` of 2-D int8 weight codes with channels along ``axis``:
    themselves with zero point 0, or ``q + 128`` as uint8 with zero point 128 (the same numbers,
    ``dq = s (v - zp)``)."""
    channels = codes.shape[axis]
    if as_uint8:
        return (codes.astype(np.int16) + 128).astype(np.uint8), np.full(channels, 128, np.uint8)
    return codes.astype(np.int8), np.zeros(channels, np.int8)


def dequantize_weight(codes: np.ndarray, scales: np.ndarray, axis: int) -> np.ndarray:
    shape = [1, 1]
    shape[axis] = -1
    return (codes.astype(np.float32) * scales.reshape(shape).astype(np.float32)).astype(np.float32)


def denoising_delta(noise: np.ndarray, w_q: np.ndarray) -> np.ndarray:
    """``B' - B = -N dq(W)``: what NoisyQuant's denoising bias adds to a layer's bias, so that
    ``q(X + N) dq(W) + B'`` is an unbiased estimate of ``X dq(W) + B`` (``w_q``: ``dq(W)`` in ``[K, N]`` layout, in
    the precision the caller computes in). The search, the rounding, the simulation and the folding pass all take it
    from here."""
    return -(noise @ w_q)


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum(ref^2) / sum((ref - approx)^2))`` in dB."""
    reference = np.asarray(reference, dtype=np.float64)
    noise = float(np.sum((reference - np.asarray(approx, dtype=np.float64)) ** 2))
    signal = float(np.sum(reference**2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(signal / noise)
