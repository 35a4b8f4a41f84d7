"""The Celery app and its thin tasks. Start a worker with ``uploader worker``."""
