"""Benchmark harness for the uploader: ``python -m bench`` (see bench/README.md).

Starts its own SeaweedFS S3 server, Redis and celery worker on loopback ports, uploads the same
random file with this project and with peer tools (boto3, boto3 + CRT, s5cmd, rclone) interleaved,
and writes medians to ``bench/results/latest.{json,md,png}``.
"""
