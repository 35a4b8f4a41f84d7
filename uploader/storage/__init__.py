"""The object store's room: provider profiles and named endpoints (the S3 adapter moves here later)."""
