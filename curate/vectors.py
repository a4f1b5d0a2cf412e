"""Embedding columns (Arrow `fixed_size_list<float32>[d]`, null where a row has none) to
and from numpy matrices, without Python loops."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def vector_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def to_matrix(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(matrix (n, d) float32 with zero rows where null, valid mask (n,))."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array(
            [], column.type)
    dim = column.type.list_size
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    values = column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    offset = column.offset * dim
    matrix = values[offset: offset + len(column) * dim].reshape(len(column), dim)
    if not valid.all():
        matrix = np.where(valid[:, None], matrix, np.float32(0))
    return matrix, valid


def from_matrix(matrix: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """A fixed_size_list<float32> column; rows where `valid` is False are null."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    _n, dim = matrix.shape
    mask = None if valid is None or valid.all() else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), dim, mask=mask)


def pixels_column(pixels: np.ndarray, valid: np.ndarray) -> pa.Array:
    """uint8 model inputs (n, ...) as a fixed_size_list<uint8> column (null = no image)."""
    n = len(valid)
    size = int(np.prod(pixels.shape[1:])) if pixels.ndim > 1 else 0
    full = np.zeros((n, size), np.uint8)
    if len(pixels):
        full[valid] = pixels.reshape(len(pixels), -1)
    mask = None if valid.all() else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), size, mask=mask)


def column_pixels(column: pa.Array | pa.ChunkedArray, shape: tuple[int, ...]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The valid rows of a `pixels_column` as uint8 (m, *shape), and the valid mask."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    size = column.type.list_size
    values = column.values.to_numpy(zero_copy_only=False)
    offset = column.offset * size
    matrix = values[offset: offset + len(column) * size].reshape(len(column), *shape)
    return matrix[valid], valid
