"""The Redis checkpoint: upload records, recorded parts, and their atomic transitions."""

from uploader.checkpoint.store import CheckpointStore
from uploader.model import TERMINAL_STATES, UploadRecord

__all__ = ["CheckpointStore", "UploadRecord", "TERMINAL_STATES"]
