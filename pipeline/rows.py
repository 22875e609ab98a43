"""The pipeline's side of the row contract (the schemas: actors/row_schemas.py): which input columns a job carries
(check_columns, carried_values), the preprocess stage's output built as PREPROCESSED exactly
(preprocessed_table), and a shard's part file made of its result rows (output_table).

An input column named like an OUTPUT_SCHEMA column is never carried: if it is input.id_column it is the key,
if output.columns names it the job refuses (check_columns; pipeline.generate refuses it too: check_input_columns).
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from actors.row_schemas import CARRIED, OUTPUT_SCHEMA, PREPROCESSED, RESERVED, SOURCE
from pipeline.config import ConfigError, JobConfig


def shadowing(name: str) -> ConfigError:
    """The one-line refusal of an input column that would shadow a column of the output (the CLI's and the
    Python API's alike)."""
    return ConfigError(f"output.columns: {name!r} is a column of the output itself; rename it in the input, "
                       f"or do not carry it")


def check_columns(cfg: JobConfig) -> list[str]:
    """The input columns a job carries to its output: output.columns, less the id column where it is named like
    an output column (it is the key). Any other output.columns entry named like an output column would shadow
    it: a ConfigError naming it."""
    out = []
    for name in dict.fromkeys(cfg.output.columns):
        if name in RESERVED and name != cfg.input.id_column:
            raise shadowing(name)
        if name not in RESERVED:
            out.append(name)
    return out


def check_input_columns(columns: list[str], own: list[str], id_column: str | None) -> None:
    """pipeline.generate carries every input column: one named like a column of its own output (`own`) would
    shadow it, so it is refused as the CLI refuses it in output.columns; the id column is the key itself."""
    for name in columns:
        if name in own and name != id_column:
            raise shadowing(name)


def carried_values(fields: dict, names: list[str] | None) -> dict:
    """A preprocessed row's carried values: the named fields (null where absent), or all of them where names is
    None (pipeline.generate's rows keep every input column; it refuses up front one that would shadow its own)."""
    if names is None:
        return dict(fields)
    return {name: fields.get(name) for name in names}


def check_source_row(row: dict) -> dict:
    """A normalised row (pipeline/read.py) with exactly SOURCE's columns, else a ValueError naming the drift."""
    if row.keys() != _SOURCE_NAMES:
        raise ValueError(f"a source row drifted from SOURCE (actors/row_schemas.py): it has {sorted(row)}, "
                         f"the contract {SOURCE.names}")
    return row


def _token_ids(ids) -> np.ndarray:
    """A row's input_ids as int64, refused (ValueError) where they are not one row of integers."""
    a = np.asarray(ids)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise ValueError(f"token ids must be one row of integers, not {a.dtype} of shape {a.shape}")
    return a.astype(np.int64, copy=False)


_SOURCE_NAMES = frozenset(SOURCE.names)
_PREPROCESSED_NAMES = frozenset(PREPROCESSED.names)


def preprocessed_table(rows: list[dict]) -> pa.Table:
    """Preprocessed rows (pipeline/preprocess.py's preprocess_row) as one Arrow table of exactly PREPROCESSED's
    types; `carried` as each row's JSON object. input_ids go from the rows' numpy arrays into Arrow in one copy,
    never as Python ints. A row whose columns or values do not fit the contract fails the batch, naming them."""
    for row in rows:
        if row.keys() != _PREPROCESSED_NAMES:
            raise ValueError(f"a preprocessed row drifted from PREPROCESSED (actors/row_schemas.py): it has "
                             f"{sorted(row)}, the contract {PREPROCESSED.names}")
    arrays = []
    for field in PREPROCESSED:
        try:
            if field.name == "input_ids":
                ids = [_token_ids(r["input_ids"]) for r in rows]
                offsets = np.zeros(len(ids) + 1, np.int32)
                np.cumsum([len(a) for a in ids], out=offsets[1:])
                values = np.concatenate(ids) if ids else np.zeros(0, np.int64)
                arrays.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(values), type=field.type))
            elif field.name == CARRIED:
                arrays.append(pa.array([json.dumps(r[CARRIED], default=str) for r in rows], field.type))
            else:
                arrays.append(pa.array([r[field.name] for r in rows], field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"preprocessed column {field.name!r} does not fit PREPROCESSED's {field.type}: "
                             f"{e}") from None
    return pa.Table.from_arrays(arrays, schema=PREPROCESSED)


def _writable(t: pa.DataType) -> bool:
    """Whether parquet can hold the type: not a struct without fields (a JSON {}), at any depth."""
    if pa.types.is_struct(t):
        return t.num_fields > 0 and all(_writable(f.type) for f in t)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _writable(t.value_type)
    return True


def _column(values: list) -> pa.Array:
    """A carried column from Python values; one whose rows hold different types (1 here, "high" there) is kept
    as text (non-strings as JSON) rather than failing the shard."""
    try:
        array = pa.array(values)
        if _writable(array.type):
            return array
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        pass
    return pa.array([v if v is None or isinstance(v, str) else json.dumps(v, default=str) for v in values],
                    pa.string())


def carried_columns(tables: list[pa.Table], names: list[str] | None = None) -> dict[str, pa.Array]:
    """The carried columns of result tables, as top-level columns (names None: every one they hold, in order),
    each with its values' Arrow type over all the tables (text, non-strings as JSON, where they share none)."""
    rows = [json.loads(v) for t in tables for v in t.column(CARRIED).to_pylist()]
    if names is None:
        names = list(dict.fromkeys(k for r in rows for k in r))
    return {name: _column([r.get(name) for r in rows]) for name in names}


def output_table(shard: str, parts: list[pa.Table], names: list[str]) -> pa.Table:
    """A shard's part file from its result rows, in order: OUTPUT_SCHEMA (a null key becomes "<shard>:<row
    index>"), then the carried columns `names`."""
    fixed = [p.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA) for p in parts]
    table = pa.concat_tables(fixed) if fixed else OUTPUT_SCHEMA.empty_table()
    key = table.column("key").combine_chunks()
    if key.null_count:
        default = pa.array([f"{shard}:{i}" for i in range(table.num_rows)], pa.string())
        table = table.set_column(0, OUTPUT_SCHEMA.field("key"), pc.if_else(key.is_valid(), key, default))
    for name, column in carried_columns(parts, names).items():
        table = table.append_column(name, column)
    return table
