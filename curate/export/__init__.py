"""Exports of the table for training: `export` (curate.export.exporter) plans and runs them,
`sharding` cuts the selection into shards, `writers` write WebDataset tars and Parquet
parts, `buckets` sorts samples into aspect-ratio buckets."""

from curate.export.exporter import ExportError, ExportOptions, ExportSummary, export, parse_options

__all__ = ["ExportError", "ExportOptions", "ExportSummary", "export", "parse_options"]
