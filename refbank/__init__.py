"""The Parquet reference bank of ``fp`` (storage only; imports pyarrow, never torch)."""
