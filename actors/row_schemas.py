"""The rows that pass between the stages, defined once: their columns and Arrow types (torch-free, so the driver,
the preprocess tasks and the actors all read the same contract).

    read ─SOURCE─► preprocess ─PREPROCESSED─► generate ─RESULT─► driver ─OUTPUT─► part-<shard>.parquet

SOURCE (pipeline/read.py's normaliser; handed to preprocessing within the same task, so never an Arrow block):
    shard, key (the id column's value as text, or null: the driver names the row "<shard>:<row index>"),
    image (bytes) or image_path, error (why the input row itself is broken), and fields: a dict of the input
    columns the job needs (those the prompt names, and output.columns), values made plain (bytes that are not
    UTF-8 become null); a column the row lacks is absent, which the prompt reports apart from a null. Its
    columns are checked on every row at the preprocess stage (pipeline/stages.py).
PREPROCESSED (pipeline/preprocess.py, one per input row; built as an Arrow table of exactly these types by
    pipeline/rows.py's preprocessed_table, so a drift fails the batch loudly): input_ids, num_prompt_tokens,
    model_inputs (the processor's image tensors, TENSOR entries; null on an error row), error, carried.
RESULT (the generate actor, one per preprocessed row, in order: actors/generate_rows.py's result_table).
OUTPUT: OUTPUT_SCHEMA, then output.columns in their order, each with its values' type over the shard (text, with
    non-strings as JSON, where the values share no type).

`carried`: the input columns the output keeps (output.columns), as one JSON object per row. Their values may
share no Arrow type (1 in one row, "high" in another), and Ray Data cannot join blocks whose types differ, so
they travel as text of one fixed type (never pickled); stages pass it through untouched, and the driver settles
each column's Arrow type over a whole shard when it commits (pipeline/rows.py). Values are plain JSON values
(pipeline/read.py makes them so); anything else (a timestamp) arrives as its text.
"""
from __future__ import annotations

import pyarrow as pa

CARRIED = "carried"
# one tensor: Arrow's own bytes, read back as a numpy view with np.frombuffer (no copy, no .npz)
TENSOR = pa.struct([("name", pa.string()), ("dtype", pa.string()), ("shape", pa.list_(pa.int64())),
                    ("data", pa.binary())])
SOURCE = pa.schema([
    ("shard", pa.string()), ("key", pa.string()), ("image", pa.binary()), ("image_path", pa.string()),
    ("fields", pa.struct([])),  # its children: the columns the job needs
    ("error", pa.string()),
])
PREPROCESSED = pa.schema([
    ("shard", pa.string()), ("key", pa.string()),  # key: null until the driver names it <shard>:<row index>
    ("input_ids", pa.list_(pa.int64())), ("num_prompt_tokens", pa.int32()),
    ("model_inputs", pa.list_(TENSOR)), ("error", pa.string()),
    (CARRIED, pa.string()),
])
RESULT = pa.schema([
    ("shard", pa.string()), ("key", pa.string()), ("text", pa.string()), ("finish_reason", pa.string()),
    ("num_prompt_tokens", pa.int32()), ("num_output_tokens", pa.int32()), ("num_drafted_tokens", pa.int32()),
    ("num_accepted_tokens", pa.int32()), ("error", pa.string()), ("generate_s", pa.float64()),
    # compression.evaluate, sampled rows only: reference tokens, how many the job's model agreed with
    # (teacher-forced), and whether the two greedy outputs are the same text
    ("eval_tokens", pa.int32()), ("eval_agreed", pa.int32()), ("eval_exact", pa.bool_()),
    ("drafter_version", pa.int32()),  # model.drafter_training: the drafter version that drafted the row
    (CARRIED, pa.string()),
])
PASSED = ("shard", "key", "num_prompt_tokens", CARRIED)  # result columns taken from the preprocessed row as they are
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
RESERVED = frozenset(OUTPUT_SCHEMA.names)  # an input column named like one of these is never carried
