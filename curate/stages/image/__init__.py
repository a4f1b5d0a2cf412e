"""Stages over images (and, frame by frame, video clips): one file per stage type."""
