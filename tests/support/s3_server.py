"""An S3-compatible server (moto) on an ephemeral port, for the object-store tests.

Creates the buckets named on the command line, prints `http://127.0.0.1:PORT` on one line and
serves until its standard input closes (the test holds the pipe, so the server ends with it).
`--port N` first serves on port N, so a test can bring a killed store back where it was (empty:
moto keeps its objects in memory).
"""

import sys

import boto3
from moto.server import ThreadedMotoServer


def main() -> None:
    args = sys.argv[1:]
    port = 0
    if args[:1] == ["--port"]:
        port, args = int(args[1]), args[2:]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    for bucket in args:
        s3.create_bucket(Bucket=bucket)
    print(endpoint, flush=True)
    sys.stdin.read()
    server.stop()


if __name__ == "__main__":
    main()
