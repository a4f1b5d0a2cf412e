"""Stages over videos and their clips: one file per stage type."""
