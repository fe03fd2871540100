"""A full image kept as its stored values, mapped to [0, 1] only where it is read: bounded memory per input image.

A 100-Mpixel 16-bit mammogram is 200 MB as stored, but 400 MB as float32 and 800 MB as float64, and every
whole-image arithmetic step (rescale, window, clip, invert) makes another copy. :class:`MappedImage` holds the
stored array once (for DICOM, a view on the decoded pixel data) together with the point-wise map from a stored value
to the float32 intensity in [0, 1] that the rest of the bundle works with. Indexing (``image[r0:r1, c0:c1]``) maps
only that window, which is all that :func:`scripts.data.prepare.roi.crop_roi` needs; whole-image statistics (the
range, NaN/inf, blank) and full copies (``np.asarray(image)``) go through row blocks of :data:`BLOCK_PIXELS`
pixels, so no step holds a second full-size array.

For integer data the map is usually a lookup table over the stored value range (:func:`table_image`), checked over
the values that actually occur (:func:`value_histogram`): a DICOM's modality LUT, VOI LUT or window, clipping and
MONOCHROME1 inversion are computed once per distinct value instead of once per pixel, and give the same numbers.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

BLOCK_PIXELS = 1 << 20  # row blocks of about 1 Mpixel (4 MB as float32, 8 MB as int64) for whole-image passes
MAX_TABLE = 1 << 20  # integer value ranges up to this many values use a lookup table


class MappedImage:
    """``(H, W)`` float32 intensities in [0, 1], computed on access from a stored 2-D array.

    Args:
        stored: the 2-D array as decoded (any numeric dtype; may be a read-only view or a transposed view).
        fn: maps a block of ``stored`` (any shape) to float32 values of the same shape; point-wise.
        value_range: ``(min, max)`` of the mapped values when the caller knows them and knows them all finite (a
            checked lookup table); else both are computed block by block on request.
    """

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(
        self,
        stored: np.ndarray,
        fn: Callable[[np.ndarray], np.ndarray],
        value_range: tuple[float, float] | None = None,
    ) -> None:
        if stored.ndim != 2:
            raise ValueError(f"a 2-D array is expected, got shape {stored.shape}")
        self.stored = stored
        self.fn = fn
        self._range = value_range
        self._nonfinite: int | None = 0 if value_range is not None else None

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.stored.shape[0]), int(self.stored.shape[1]))

    @property
    def size(self) -> int:
        return int(self.stored.size)

    def __getitem__(self, key) -> np.ndarray:
        """The mapped values of ``stored[key]`` (float32; only that part is mapped)."""
        return np.asarray(self.fn(self.stored[key]), dtype=np.float32)

    def blocks(self) -> Iterator[tuple[slice, np.ndarray]]:
        """``(row slice, mapped rows)`` in row blocks of about :data:`BLOCK_PIXELS` pixels."""
        yield from ((rows, self[rows]) for rows in row_blocks(self.stored))

    def value_range(self) -> tuple[float, float]:
        """``(min, max)`` of the finite mapped values (computed block by block unless given)."""
        if self._range is None:
            lo, hi, self._nonfinite = block_range(self.stored, self.fn)
            self._range = (lo, hi)
        return self._range

    def count_nonfinite(self) -> int:
        """How many mapped values are NaN or infinite (0 when the range was given: a lookup table is checked)."""
        if self._nonfinite is None:
            lo, hi, self._nonfinite = block_range(self.stored, self.fn)
            self._range = self._range or (lo, hi)
        return self._nonfinite

    def above(self, threshold: float) -> np.ndarray:
        """Boolean ``(H, W)``: mapped value > ``threshold`` (one byte per pixel, built block by block)."""
        out = np.empty(self.shape, dtype=bool)
        for rows, block in self.blocks():
            np.greater(block, threshold, out=out[rows])
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The whole mapped image as one float32 array (the only full-size float copy, filled block by block)."""
        out = np.empty(self.shape, dtype=np.float32)
        for rows, block in self.blocks():
            out[rows] = block
        return out if dtype is None else out.astype(dtype, copy=False)


def row_blocks(arr: np.ndarray, block_pixels: int = BLOCK_PIXELS) -> Iterator[slice]:
    """Row slices of ``arr`` (2-D) holding about ``block_pixels`` pixels each."""
    step = max(1, block_pixels // max(int(arr.shape[1]), 1))
    for r0 in range(0, int(arr.shape[0]), step):
        yield slice(r0, min(r0 + step, int(arr.shape[0])))


def unused_bits_fix(dtype: np.dtype, bits_stored: int) -> Callable[[np.ndarray], np.ndarray]:
    """The correction for DICOM's unused high bits (PS3.5 8.1.1) of an integer ``dtype`` with ``bits_stored`` bits:
    unsigned values are masked, signed values sign-extended from bit ``bits_stored - 1``; identity when every bit is
    used. Applied to blocks, so that the decoded array itself can stay a read-only view."""
    dtype = np.dtype(dtype)
    shift = dtype.itemsize * 8 - int(bits_stored)
    if dtype.kind not in "ui" or not 0 < shift < dtype.itemsize * 8:
        return lambda block: block
    s = dtype.type(shift)
    return lambda block: np.right_shift(np.left_shift(block, s), s)


def value_histogram(
    stored: np.ndarray, fix: Callable[[np.ndarray], np.ndarray] = lambda b: b
) -> tuple[int, np.ndarray] | None:
    """``(offset, counts)``: how often each value ``offset + i`` occurs in ``fix(stored)``, counted block by block;
    ``None`` for non-integer data or a value range wider than :data:`MAX_TABLE`."""
    if stored.dtype.kind not in "uib":
        return None
    lo, hi = None, None
    if stored.dtype.itemsize <= 2:
        info = np.iinfo(np.uint8 if stored.dtype.kind == "b" else stored.dtype)
        lo, hi = int(info.min), int(info.max)
    else:
        for rows in row_blocks(stored):
            block = fix(stored[rows])
            b_lo, b_hi = int(block.min()), int(block.max())
            lo, hi = (b_lo, b_hi) if lo is None else (min(lo, b_lo), max(hi, b_hi))
        if lo is None or hi - lo + 1 > MAX_TABLE:
            return None
    counts = np.zeros(hi - lo + 1, dtype=np.int64)
    for rows in row_blocks(stored):
        block = fix(stored[rows]).astype(np.int64).ravel()
        block -= lo
        counts += np.bincount(block, minlength=counts.size)
    return lo, counts


def table_image(
    stored: np.ndarray,
    table: np.ndarray,
    offset: int,
    present: np.ndarray,
    fix: Callable[[np.ndarray], np.ndarray] = lambda b: b,
) -> MappedImage:
    """A :class:`MappedImage` whose map is a lookup: stored value ``v`` (after ``fix``) -> ``table[v - offset]``.

    Args:
        stored: the decoded integer array.
        table: float32 intensity of each value ``offset .. offset + len(table) - 1``.
        offset: the value of ``table[0]``.
        present: boolean, which table entries occur in the image (from :func:`value_histogram`); gives the range.
        fix: the unused-bits correction applied to each block before the lookup (:func:`unused_bits_fix`).
    """
    table = np.asarray(table, dtype=np.float32)

    def fn(block: np.ndarray) -> np.ndarray:
        index = fix(block).astype(np.intp)
        index -= offset
        return table[index]

    values = table[present]
    value_range = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    return MappedImage(stored, fn, value_range)


def block_range(arr: np.ndarray, fn: Callable[[np.ndarray], np.ndarray] = lambda b: b) -> tuple[float, float, int]:
    """``(min, max, count of NaN/inf)`` of ``fn(arr)``, computed block by block (min/max over the finite values;
    ``(inf, -inf, n)`` when none is finite)."""
    lo, hi, bad = np.inf, -np.inf, 0
    for rows in row_blocks(arr):
        block = np.asarray(fn(arr[rows]))
        if block.dtype.kind == "f":
            finite = np.isfinite(block)
            n_finite = int(np.count_nonzero(finite))
            bad += block.size - n_finite
            if n_finite < block.size:
                block = block[finite]
            if not block.size:
                continue
        lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
    return lo, hi, bad
