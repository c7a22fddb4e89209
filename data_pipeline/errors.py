"""The error the data commands report as one line (`error: ...`, exit status 1) instead of a traceback.

A DataError is a ValueError, so callers that already catch ValueError (data_pipeline/training_data.py's
training_dataset turns it into a ConfigError naming data.shards) keep working.
"""
from __future__ import annotations


class DataError(ValueError):
    """Input data, or a folder of earlier results, that the command cannot use; the message names the file."""
