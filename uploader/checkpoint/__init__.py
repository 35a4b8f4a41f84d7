"""The Redis checkpoint: upload records, recorded parts, and their atomic transitions."""

from uploader.checkpoint.store import TERMINAL_STATES, CheckpointStore, UploadRecord

__all__ = ["CheckpointStore", "UploadRecord", "TERMINAL_STATES"]
