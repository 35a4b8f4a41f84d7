"""The fault suite: real workers, Redis and SeaweedFS under crashes, S3 faults, a Redis restart,
duplicates and races. See docs/reliability.md."""
