"""CRC-32 checksums of checkpoint files, computed while the file's bytes move.

Every file of a checkpoint is checksummed as it is written and verified as it is read. The CRC
(zlib's polynomial) comes from ``isal`` (ISA-L) or ``zlib_ng`` when one is installed
(``pip install trainpatterns[checkpoint]``: 3-4x faster than zlib here, which matters on restore),
else from ``zlib``; all give the same value and release the GIL. A write hashes on a helper thread
(:class:`Crc32`) while the writing thread moves the next chunk; a restore's reading threads each
hash the share they read, and :func:`crc32_combine` joins the shares' CRCs into the file's.
"""
from __future__ import annotations

import concurrent.futures
import zlib
from typing import Optional

from .threads import hash_worker

__all__ = ["crc32", "crc32_combine", "Crc32"]


def _pick_crc32():
    for module, attr in (("isal.isal_zlib", "crc32"), ("zlib_ng.zlib_ng", "crc32")):
        try:
            return getattr(__import__(module, fromlist=[attr]), attr)
        except ImportError:
            continue
    return zlib.crc32


crc32 = _pick_crc32()  # crc32(buffer, value=0) -> int, same results as zlib.crc32

_POLY = 0xEDB88320  # zlib's CRC-32 polynomial, bit-reversed


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC polynomial (bit-reversed, as zlib's crc32_combine computes it)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^k) modulo the polynomial, k = 0..31
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def _crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """zlib's crc32_combine: the CRC-32 of A + B from crc1 = CRC(A), crc2 = CRC(B), len2 = len(B)."""
    p, k = 1 << 31, 3  # x^0; x^(8 * len2) is the shift of crc1 over B's bytes
    while len2:
        if len2 & 1:
            p = _multmodp(_X2N[k & 31], p)
        len2 >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2


def _pick_combine():
    for module in ("isal.isal_zlib", "zlib_ng.zlib_ng"):
        try:
            return getattr(__import__(module, fromlist=["crc32_combine"]), "crc32_combine")
        except (ImportError, AttributeError):
            continue
    return _crc32_combine


crc32_combine = _pick_combine()  # crc32_combine(crc(A), crc(B), len(B)) -> crc(A + B)


class Crc32:
    """CRC-32 of a byte stream fed in order, computed on a helper thread (one worker, so chunks are
    hashed in the order given). Buffers must stay unchanged until :meth:`value` returns."""

    def __init__(self) -> None:
        self._last: Optional[concurrent.futures.Future] = None

    def update(self, buf) -> None:
        prev = self._last
        self._last = hash_worker().submit(lambda: crc32(buf, 0 if prev is None else prev.result()))

    def value(self) -> int:
        return 0 if self._last is None else self._last.result()
