"""The bank's tables: columns, types, meaning, and the schema version.

A bank is a folder holding two Parquet tables, ``curves.parquet`` and
``baselines.parquet``, plus ``bank.json`` and one folder per baseline under
``baselines/<baseline_id>/`` for the engine's arrays. The columns below are the whole
contract: any Parquet reader (pyarrow, pandas, duckdb, polars, Spark) can read a bank.

``SCHEMA_VERSION`` is written into ``bank.json`` and into each table's Parquet key-value
metadata (key ``fp.schema_version``); each column's meaning is in its field metadata
(key ``description``). A reader refuses a bank of a newer version than it
knows; a new version only ever adds columns.
"""

from __future__ import annotations

import pyarrow as pa

#: Version of the table layout written by this release.
SCHEMA_VERSION = 1

#: Key of the schema version in each Parquet file's key-value metadata.
VERSION_KEY = b"fp.schema_version"

#: Name of the column holding each row's SHA-256 (see :mod:`refbank.hashing`).
HASH_COLUMN = "row_sha256"

_TS = pa.timestamp("us", tz="UTC")

#: (name, type, nullable, meaning) of every ``curves`` column, in order.
CURVE_COLUMNS: tuple[tuple[str, pa.DataType, bool, str], ...] = (
    ("curve_id", pa.string(), False, "unique id of the curve, e.g. `c_3f9a1b2c4d5e`"),
    ("model", pa.string(), False, "generator the images came from"),
    ("family", pa.string(), False, "architecture family of the generator"),
    ("checkpoint", pa.string(), True, "checkpoint or release of the generator"),
    ("source", pa.string(), True, "where the images came from (URL, folder, person)"),
    ("notes", pa.string(), True, "free text"),
    ("split", pa.string(), False, "split tag, `enroll` unless set otherwise"),
    ("encoder", pa.string(), False, "encoder name, e.g. `timm:vit_tiny_patch16_224`"),
    ("weights_sha256", pa.string(), False, "SHA-256 of the encoder weights"),
    ("baseline_id", pa.string(), False, "id of the baseline the curve was measured against"),
    ("layers", pa.list_(pa.string()), False, "layer names, in order"),
    ("values", pa.list_(pa.float64()), False, "C_T value per layer"),
    ("n_images", pa.int64(), False, "number of images behind the curve"),
    ("manifest_sha256", pa.string(), False, "SHA-256 of the image manifest"),
    ("partitioner", pa.string(), True, "partitioner used by the baseline"),
    ("distance", pa.string(), True, "nearest-neighbour distance used by the baseline"),
    ("tau", pa.float64(), True, "the engine's tau parameter"),
    ("pooling", pa.string(), True, "how token embeddings were pooled"),
    ("seed", pa.int64(), True, "seed of every random step"),
    ("params_json", pa.string(), False, "every other parameter, as canonical JSON"),
    ("fingerprints_json", pa.string(), False,
     "`{fingerprint name: [floats]}` at enrolment, as canonical JSON (`{}`: none)"),
    ("tool_version", pa.string(), False, "fp version that computed the curve"),
    ("created", _TS, False, "when the row was written (UTC)"),
    (HASH_COLUMN, pa.string(), False, "SHA-256 of the row's other columns"),
)

#: (name, type, nullable, meaning) of every ``baselines`` column, in order.
BASELINE_COLUMNS: tuple[tuple[str, pa.DataType, bool, str], ...] = (
    ("baseline_id", pa.string(), False, "unique id of the baseline (the engine's id)"),
    ("name", pa.string(), False, "unique name chosen by the user"),
    ("encoder", pa.string(), False, "encoder name"),
    ("weights_sha256", pa.string(), False, "SHA-256 of the encoder weights"),
    ("layers", pa.list_(pa.string()), False, "layer names, in order"),
    ("train_manifest_sha256", pa.string(), False, "SHA-256 of the manifest of T (train)"),
    ("heldout_manifest_sha256", pa.string(), False, "SHA-256 of the manifest of P (held-out)"),
    ("n_train", pa.int64(), True, "number of images in T"),
    ("n_heldout", pa.int64(), True, "number of images in P"),
    ("partitioner", pa.string(), True, "partitioner"),
    ("distance", pa.string(), True, "nearest-neighbour distance"),
    ("tau", pa.float64(), True, "the engine's tau parameter"),
    ("pooling", pa.string(), True, "how token embeddings were pooled"),
    ("seed", pa.int64(), True, "seed of every random step"),
    ("params_json", pa.string(), False, "every other parameter, as canonical JSON"),
    ("path", pa.string(), False, "folder of the engine's files, relative to the bank"),
    ("files_sha256", pa.string(), False, "SHA-256 over the names and contents of those files"),
    ("notes", pa.string(), True, "free text"),
    ("tool_version", pa.string(), False, "fp version that built the baseline"),
    ("created", _TS, False, "when the row was written (UTC)"),
    (HASH_COLUMN, pa.string(), False, "SHA-256 of the row's other columns"),
)

#: Columns named in ``params_json``'s place: the parameters every row spells out.
PARAM_COLUMNS: tuple[str, ...] = ("partitioner", "distance", "tau", "pooling", "seed")


#: Key of each column's meaning in its Arrow field metadata (shown by Parquet tools).
DESCRIPTION_KEY = b"description"


def arrow_schema(columns: tuple[tuple[str, pa.DataType, bool, str], ...]) -> pa.Schema:
    """The Arrow schema of a table: the schema version in its metadata, and each column's
    meaning in its field metadata (key ``description``)."""
    fields = [pa.field(name, typ, nullable=nullable,
                       metadata={DESCRIPTION_KEY: meaning.encode()})
              for name, typ, nullable, meaning in columns]
    return pa.schema(fields, metadata={VERSION_KEY: str(SCHEMA_VERSION).encode()})


CURVES_SCHEMA = arrow_schema(CURVE_COLUMNS)
BASELINES_SCHEMA = arrow_schema(BASELINE_COLUMNS)

TABLES: dict[str, pa.Schema] = {"curves": CURVES_SCHEMA, "baselines": BASELINES_SCHEMA}
