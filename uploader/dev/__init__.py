"""The local development stack (Redis, SeaweedFS, moto and workers on loopback) and the demo.

Never imported by a client or a worker: ``uploader demo`` and the tests load it; the library's
import path (``uploader.client``, ``workers``) does not, so a client needs neither boto3's
helpers nor SeaweedFS.
"""
