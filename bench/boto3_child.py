"""One boto3 upload in a process of its own, so its CPU and memory are measured alone.

    python -m bench.boto3_child --mode classic|crt --file F --bucket B --key K --endpoint URL

Prints one JSON line: the wall and CPU seconds of the transfer itself (client creation included,
interpreter start-up and imports excluded) and the process's peak RSS.

``classic`` is ``boto3 upload_file`` with s3transfer's threads and botocore's defaults (payload
signing over plain HTTP, CRC32 on every request). ``crt`` is s3transfer's CRT transfer manager
(what ``preferred_transfer_client="crt"`` selects); it is built by hand here because boto3 only
points the CRT client at AWS's own HTTPS endpoints, never at a custom ``endpoint_url``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def upload_classic(args: argparse.Namespace) -> dict:
    import boto3
    from boto3.s3.transfer import TransferConfig

    client = boto3.session.Session().client("s3", endpoint_url=args.endpoint, region_name=args.region)
    config = TransferConfig(
        multipart_threshold=args.part_size,
        multipart_chunksize=args.part_size,
        max_concurrency=args.concurrency,
        preferred_transfer_client="classic",
    )
    client.upload_file(args.file, args.bucket, args.key, Config=config)
    return {"version": boto3.__version__}


def upload_crt(args: argparse.Namespace) -> dict:
    import awscrt
    import boto3
    import botocore.session
    from botocore.config import Config
    from s3transfer.crt import (
        BotocoreCRTCredentialsWrapper,
        BotocoreCRTRequestSerializer,
        CRTTransferManager,
        create_s3_crt_client,
    )
    from s3transfer.manager import TransferConfig

    session = botocore.session.Session()
    credentials = session.get_credentials()
    if credentials is None:
        raise SystemExit("no AWS credentials in the environment")
    crt_client = create_s3_crt_client(
        region=args.region,
        crt_credentials_provider=BotocoreCRTCredentialsWrapper(credentials).to_crt_credentials_provider(),
        part_size=args.part_size,
        use_ssl=args.endpoint.startswith("https://"),
    )
    serializer = BotocoreCRTRequestSerializer(
        session,
        {"region_name": args.region, "endpoint_url": args.endpoint, "config": Config(s3={"addressing_style": "path"})},
    )
    config = TransferConfig(
        multipart_threshold=args.part_size,
        multipart_chunksize=args.part_size,
        max_request_concurrency=args.concurrency,
    )
    with CRTTransferManager(crt_client, serializer, config=config) as manager:
        manager.upload(args.file, args.bucket, args.key).result()
    return {"version": f"boto3 {boto3.__version__}, awscrt {awscrt.__version__}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["classic", "crt"], required=True)
    parser.add_argument("--file", required=True)
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("--part-size", type=int, default=8 << 20)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)

    # Import what the transfer needs before the clock starts: start-up is not throughput.
    if args.mode == "crt":
        import awscrt.s3  # noqa: F401
        import s3transfer.crt  # noqa: F401
    import boto3.s3.transfer  # noqa: F401

    cpu0, t0 = _cpu(), time.perf_counter()
    info = (upload_crt if args.mode == "crt" else upload_classic)(args)
    wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
    # Not ru_maxrss: that counts the parent's memory this process shared before exec.
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "vmhwm_kib": peak, **info}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
