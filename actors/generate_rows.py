"""The generate stage's rows as Arrow, read and written (their schemas: actors/row_schemas.py): a preprocessed row's
tensors made TENSOR entries (tensor_entries), its input_ids and tensors read back as numpy views of the batch's
Arrow buffers (read_input_ids, read_tensors), and the result rows built (result_table).
"""
from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa

from actors.row_schemas import PASSED, RESULT

# the tensors are views of Arrow's immutable buffers; the engine only copies them (stack_arrays' torch.cat)
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


def tensor_entries(arrays: dict[str, np.ndarray]) -> list[dict]:
    """A row's model_inputs value: one TENSOR entry per array (C order, the dtype with its byte order)."""
    out = []
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.hasobject:
            raise ValueError(f"model input {name!r} is not a numeric array ({a.dtype})")
        out.append({"name": name, "dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()})
    return out


def _chunks(column: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return column.chunks if isinstance(column, pa.ChunkedArray) else [column]


def _lists(chunk: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """A list array's values, and each row's [start, end) in them (null rows are empty)."""
    offsets = np.asarray(chunk.offsets)  # into chunk.values, this chunk's slice of it
    return chunk.values.slice(offsets[0], offsets[-1] - offsets[0]), offsets - offsets[0]


def read_input_ids(column: pa.Array | pa.ChunkedArray) -> list[np.ndarray]:
    """Each row's input_ids, as views of the column."""
    out = []
    for chunk in _chunks(column):
        if pa.types.is_null(chunk.type):
            out += [np.zeros(0, np.int64)] * len(chunk)
            continue
        values, bounds = _lists(chunk)
        flat = values.to_numpy(zero_copy_only=False)
        out += [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return out


def _binary(data: pa.Array) -> tuple[pa.Buffer, np.ndarray]:
    """A binary array's data buffer and where each value starts in it (len + 1 offsets)."""
    width = np.int64 if pa.types.is_large_binary(data.type) else np.int32
    offsets = np.frombuffer(data.buffers()[1], width, len(data) + 1, data.offset * np.dtype(width).itemsize)
    return data.buffers()[2], offsets


def _view(buffer: pa.Buffer, dtype: str, shape: list[int], start: int, end: int) -> np.ndarray:
    dt = np.dtype(dtype)
    count, rest = divmod(int(end) - int(start), dt.itemsize)
    if rest or count != int(np.prod(shape)) or dt.hasobject:
        raise ValueError(f"{end - start} bytes of {dt} do not make an array of shape {tuple(shape)}")
    return (np.frombuffer(buffer, dt, count, int(start)) if count else np.zeros(0, dt)).reshape(shape)


def read_tensors(column: pa.Array | pa.ChunkedArray) -> list[dict[str, np.ndarray] | Exception | None]:
    """Each row's model_inputs as {name: array}, the arrays viewing the column's buffers; None for a null, the
    exception for entries that do not make an array (a bad dtype, a size that does not fit the shape)."""
    out: list[dict[str, np.ndarray] | Exception | None] = []
    for chunk in _chunks(column):
        if pa.types.is_null(chunk.type):
            out += [None] * len(chunk)
            continue
        entries, bounds = _lists(chunk)  # the TENSOR structs of every row, in order
        names, dtypes, shapes, data = (entries.field(f).to_pylist() if f != "data" else entries.field(f)
                                       for f in ("name", "dtype", "shape", "data"))
        buffer, starts = _binary(data)
        valid = chunk.is_valid().to_pylist()
        for row, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            if not valid[row]:
                out.append(None)
                continue
            try:
                out.append({names[i]: _view(buffer, dtypes[i], shapes[i], starts[i], starts[i + 1])
                            for i in range(a, b)})
            except (TypeError, ValueError) as e:
                out.append(e)
    return out


def result_table(batch: pa.Table, columns: dict[str, list]) -> pa.Table:
    """The result rows of a preprocessed batch: RESULT's own columns from `columns` (one value per row), the
    preprocessed row's shard, key, prompt token count and carried columns, untouched."""
    arrays = []
    for field in RESULT:
        if field.name in PASSED:
            arrays.append(batch.column(field.name).cast(field.type))
        else:
            arrays.append(pa.array(columns[field.name], field.type))
    return pa.Table.from_arrays(arrays, schema=RESULT)
