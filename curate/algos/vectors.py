"""Embedding columns (Arrow `fixed_size_list<float32>[d]`, null where a row has none) to
and from numpy matrices, without Python loops."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def vector_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def list_values(column: pa.Array) -> np.ndarray:
    """The (rows, size) values of a fixed_size_list array, slice offset honoured (a view
    where Arrow allows; rows that are null hold whatever their slot holds)."""
    size = column.type.list_size
    offset = column.offset * size
    values = column.values.to_numpy(zero_copy_only=False)
    return values[offset: offset + len(column) * size].reshape(len(column), size)


def one_array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    """`column` as one array: a single chunk as it is (no copy), several combined."""
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks == 1:
            return column.chunk(0)  # combine_chunks would copy even a single chunk
        return column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    return column


def _list_array(rows: np.ndarray, valid: np.ndarray | None) -> pa.Array:
    """A fixed_size_list column of the (n, size) `rows`; rows where `valid` is False are
    null."""
    mask = None if valid is None or valid.all() else pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), rows.shape[1],
                                             mask=mask)


def to_matrix(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(matrix (n, d) float32 with zero rows where null, valid mask (n,))."""
    column = one_array(column)
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    matrix = list_values(column).astype(np.float32, copy=False)
    if not valid.all():
        matrix = np.where(valid[:, None], matrix, np.float32(0))
    return matrix, valid


def from_matrix(matrix: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """A fixed_size_list<float32> column; rows where `valid` is False are null."""
    return _list_array(np.ascontiguousarray(matrix, dtype=np.float32), valid)


def pixels_column(pixels: np.ndarray, valid: np.ndarray) -> pa.Array:
    """uint8 model inputs (n, ...) as a fixed_size_list<uint8> column (null = no image)."""
    size = int(np.prod(pixels.shape[1:])) if pixels.ndim > 1 else 0
    full = np.zeros((len(valid), size), np.uint8)
    if len(pixels):
        full[valid] = pixels.reshape(len(pixels), -1)
    return _list_array(full, valid)


def prepared_pixels(prepare, images: list) -> pa.Array:
    """`prepare(decoded images)` as a `pixels_column`; rows without an image are null."""
    valid = np.array([image is not None for image in images], bool)
    return pixels_column(prepare([image for image in images if image is not None]), valid)


def column_pixels(column: pa.Array | pa.ChunkedArray, shape: tuple[int, ...]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The valid rows of a `pixels_column` as uint8 (m, *shape), and the valid mask. A
    column of type null (a batch in which no row had an image: clips of broken videos)
    has no valid rows."""
    column = one_array(column)
    if pa.types.is_null(column.type):
        return np.zeros((0, *shape), np.uint8), np.zeros(len(column), bool)
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    return list_values(column).reshape(len(column), *shape)[valid], valid
