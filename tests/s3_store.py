"""An S3 API on loopback for the tests: moto's server, with a bucket filled from a folder.

`python tests/s3_store.py FOLDER BUCKET/PREFIX PORT READY` serves on 127.0.0.1:PORT until it is
killed, and creates the file READY once the folder's files are objects under BUCKET/PREFIX/.
"""

import sys
import threading
from pathlib import Path

# What the AWS SDKs read in a test: credentials of their own (moto takes any), a region, no
# instance metadata lookup (169.254.169.254), and none of this machine's ~/.aws.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "sem-cls-tests",
    "AWS_SECRET_ACCESS_KEY": "sem-cls-tests-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
}


def start_store(port: int = 0):
    """moto's S3 server on 127.0.0.1 (any free port for 0): (server, "127.0.0.1:port")."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"{host}:{port}"


def fill_bucket(endpoint: str, bucket_prefix: str, folder: Path) -> list[str]:
    """Every file under `folder` as an object under bucket/prefix/, by its relative path; the
    bucket is created. Returns the objects' keys."""
    import boto3

    bucket, _, prefix = bucket_prefix.partition("/")
    client = boto3.client("s3", endpoint_url=f"http://{endpoint}")
    client.create_bucket(Bucket=bucket)
    keys = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        keys.append(f"{prefix}/{path.relative_to(folder).as_posix()}".lstrip("/"))
        client.put_object(Bucket=bucket, Key=keys[-1], Body=path.read_bytes())
    return keys


if __name__ == "__main__":
    folder, bucket_prefix, port, ready = sys.argv[1:]
    _, endpoint = start_store(int(port))
    fill_bucket(endpoint, bucket_prefix, Path(folder))
    Path(ready).touch()
    threading.Event().wait()  # serves until killed: the namespace ends with its first process
