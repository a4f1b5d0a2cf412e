"""Stages over the whole table (global parts: dedup, sampling): one file per stage type."""
