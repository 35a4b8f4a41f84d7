"""The small-file path a C client takes: every file of a directory sent by awscrt's S3 client
(the CRT behind ``boto3[crt]``), all requests in flight at once, signed with SigV4, each with its
Content-MD5 and checked for 200. Not a peer users run as such: the measure of what a worker's
small-object PUTs could cost without botocore's Python HTTP path (botocore spends about 3 ms of
client CPU per 16 KiB PutObject on the bench machine; see the README's "Benchmark")."""

from __future__ import annotations

import base64
import hashlib
import io
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from bench.stats import rnd


@dataclass(frozen=True)
class CrtCost:
    wall_s: float
    cpu_s: float
    failed: int


def put_files(endpoint_url: str, bucket: str, prefix: str, paths: list[Path], *, access_key: str, secret_key: str,
              region: str) -> CrtCost:
    """PUT every file of ``paths`` as ``prefix + name``; the wall time and this process's CPU
    time (the CRT's own threads included) from the first request to the last answer."""
    from awscrt import auth, http, s3
    from awscrt import io as crt_io

    loop = crt_io.EventLoopGroup(1)
    bootstrap = crt_io.ClientBootstrap(loop, crt_io.DefaultHostResolver(loop))
    signing = auth.AwsSigningConfig(
        algorithm=auth.AwsSigningAlgorithm.V4, signature_type=auth.AwsSignatureType.HTTP_REQUEST_HEADERS,
        credentials_provider=auth.AwsCredentialsProvider.new_static(access_key, secret_key), region=region,
        service="s3", signed_body_value=auth.AwsSignedBodyValue.UNSIGNED_PAYLOAD,
    )
    client = s3.S3Client(bootstrap=bootstrap, region=region, signing_config=signing, tls_mode=s3.S3RequestTlsMode.DISABLED)
    host = urlsplit(endpoint_url).netloc
    codes: list[int] = []

    def put(path: Path) -> s3.S3Request:
        body = path.read_bytes()
        md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
        headers = http.HttpHeaders([("Host", host), ("Content-Length", str(len(body))), ("Content-MD5", md5)])
        request = http.HttpRequest("PUT", f"/{bucket}/{prefix}{path.name}", headers, io.BytesIO(body))
        return client.make_request(
            type=s3.S3RequestType.DEFAULT, request=request, operation_name="PutObject",
            on_headers=lambda status_code, headers, **_: codes.append(status_code),
        )

    cpu0, wall0 = time.process_time(), time.perf_counter()
    requests = [put(path) for path in paths]
    failed = 0
    for request in requests:
        try:
            request.finished_future.result()
        except Exception:  # noqa: BLE001  (an error answer: counted)
            failed += 1
    cost = CrtCost(time.perf_counter() - wall0, time.process_time() - cpu0, failed + sum(code != 200 for code in codes))
    return cost


def row(cost: CrtCost, count: int) -> dict[str, float | int]:
    return {
        "wall_s": rnd(cost.wall_s), "files_per_s": rnd(count / cost.wall_s, 0),
        "cpu_ms_per_file": rnd(cost.cpu_s / count * 1000, 2), "failed": cost.failed,
    }
