"""The store: Arrow schemas, atomic Parquet shards and a DuckDB catalog of views over them;
storage.mirror copies it to S3 and back."""

from storage.errors import (
    QueryError,
    SandboxRefused,
    SchemaMismatch,
    StoreBusy,
    StoreError,
    StoreFull,
    StoreLocked,
    StoreNotFound,
    UnknownTable,
)
from storage.mirror import MirrorError
from storage.sandbox import sql
from storage.schemas import DERIVED_VIEWS, TABLES, TableSpec
from storage.store import CompactResult, Store, WriteResult

__all__ = [
    "CompactResult",
    "DERIVED_VIEWS",
    "MirrorError",
    "TABLES",
    "QueryError",
    "SandboxRefused",
    "SchemaMismatch",
    "Store",
    "StoreBusy",
    "StoreError",
    "StoreFull",
    "StoreLocked",
    "StoreNotFound",
    "TableSpec",
    "UnknownTable",
    "WriteResult",
    "sql",
]
