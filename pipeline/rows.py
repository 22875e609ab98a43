"""The rows that pass between the stages, defined once: their columns and Arrow types.

    read ─SOURCE─► preprocess ─PREPROCESSED─► generate ─RESULT─► driver ─OUTPUT─► part-<shard>.parquet

SOURCE (pipeline/read.py's normaliser; handed to preprocessing within the same task, so never an Arrow block):
    shard, key (the id column's value as text, or null: the driver names the row "<shard>:<row index>"),
    image (bytes) or image_path, error (why the input row itself is broken), and fields: a dict of the input
    columns the job needs (those the prompt names, and output.columns), values made plain (bytes that are not
    UTF-8 become null); a column the row lacks is absent, which the prompt reports apart from a null.
PREPROCESSED and RESULT: actors/generate_rows.py (the generate actor reads the one and writes the other). Only
    `carried` (output.columns) travels past preprocessing; the prompt's columns are used up there.
OUTPUT: OUTPUT_SCHEMA, then output.columns in their order, each with its values' type over the shard (text, with
    non-strings as JSON, where the values share no type).

An input column named like an OUTPUT_SCHEMA column is never carried: if it is input.id_column it is the key,
if output.columns names it the job refuses (check_columns), and otherwise it is left behind.
"""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc

from actors.generate_rows import CARRIED, PREPROCESSED, RESULT, TENSOR  # noqa: F401 - the contract, in one place
from pipeline.config import ConfigError, JobConfig

SOURCE = pa.schema([
    ("shard", pa.string()), ("key", pa.string()), ("image", pa.binary()), ("image_path", pa.string()),
    ("fields", pa.struct([])),  # its children: the columns the job needs
    ("error", pa.string()),
])
OUTPUT_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("shard", pa.string()),
    ("text", pa.string()),
    ("finish_reason", pa.string()),
    ("num_prompt_tokens", pa.int32()),
    ("num_output_tokens", pa.int32()),
    ("num_drafted_tokens", pa.int32()),
    ("num_accepted_tokens", pa.int32()),
    ("error", pa.string()),
])  # + output.columns
RESERVED = frozenset(OUTPUT_SCHEMA.names)


def check_columns(cfg: JobConfig) -> list[str]:
    """The input columns a job carries to its output: output.columns, less the id column where it is named like
    an output column (it is the key). Any other output.columns entry named like an output column would shadow
    it: a ConfigError naming it."""
    out = []
    for name in dict.fromkeys(cfg.output.columns):
        if name in RESERVED and name != cfg.input.id_column:
            raise ConfigError(f"output.columns: {name!r} is a column of the output itself "
                              f"({', '.join(OUTPUT_SCHEMA.names)}); rename it in the input or drop it here")
        if name not in RESERVED:
            out.append(name)
    return out


def carried_values(fields: dict, names: list[str] | None) -> dict:
    """A preprocessed row's carried struct: the named fields (null where absent); all of them, less those named
    like an output column, where names is None (pipeline.generate's rows keep every input column)."""
    if names is None:
        return {k: v for k, v in fields.items() if k not in RESERVED}
    return {name: fields.get(name) for name in names}


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


def _names(chunks: list[pa.Array]) -> list[str]:
    """The carried columns the chunks hold, in order."""
    names: dict[str, None] = {}
    for c in chunks:
        if pa.types.is_struct(c.type):
            names.update((f.name, None) for f in c.type)
        else:  # pickled rows (see actors/generate_rows.py)
            for row in c.to_pylist():
                names.update((k, None) for k in row or {})
    return list(names)


def _carried_column(chunks: list[pa.Array], name: str) -> pa.ChunkedArray | pa.Array:
    """One carried column over the chunks of `carried` structs: zero-copy where every chunk holds it with one
    type (or all nulls), else rebuilt from its Python values."""
    typed = []
    for c in chunks:
        if not pa.types.is_struct(c.type):
            typed = None
            break
        typed.append(c.field(name) if c.type.get_field_index(name) >= 0 else pa.nulls(len(c)))
    if typed is not None:
        types = {a.type for a in typed if not pa.types.is_null(a.type)}
        if len(types) <= 1:
            t = types.pop() if types else pa.null()
            if _writable(t):
                return pa.chunked_array([a.cast(t) for a in typed], t)
        return _column([v for a in typed for v in a.to_pylist()])
    return _column([(row or {}).get(name) for c in chunks for row in c.to_pylist()])


def carried_columns(tables: list[pa.Table], names: list[str] | None = None) -> dict[str, pa.ChunkedArray]:
    """The carried columns of result tables, as top-level columns (names None: every one they hold)."""
    chunks = [c for t in tables for c in t.column(CARRIED).chunks]
    return {name: _carried_column(chunks, name) for name in (_names(chunks) if names is None else names)}


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
