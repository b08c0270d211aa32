"""An Azure Blob Storage emulator (Azurite) on an ephemeral port, for the object-store tests.

Starts `azurite-blob` (npm's `azurite`, found on PATH) in memory,
creates the containers named on the command line in the emulator's well-known account, prints
the blob endpoint `http://127.0.0.1:PORT` on one line and serves until its standard input closes
(the test holds the pipe, so the emulator ends with it).
"""

import base64
import email.utils
import hashlib
import hmac
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request

# Azurite's well-known development account and key (public, documented by Microsoft).
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
VERSION = "2021-08-06"


def create_container(endpoint: str, name: str) -> None:
    """PUT Container, signed with the account key (Shared Key authorization)."""
    date = email.utils.formatdate(usegmt=True)
    headers = {"x-ms-date": date, "x-ms-version": VERSION}
    canonical_headers = "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()))
    # VERB, then eleven standard headers (all empty for a body-less PUT), then the x-ms- headers
    # and the resource: the account, the path (which for the emulator starts with the account),
    # and the query parameters.
    to_sign = (
        "PUT\n" + "\n" * 11 + canonical_headers + f"/{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container"
    )
    mac = hmac.new(base64.b64decode(KEY), to_sign.encode(), hashlib.sha256).digest()
    headers["Authorization"] = f"SharedKey {ACCOUNT}:{base64.b64encode(mac).decode()}"
    request = urllib.request.Request(
        f"{endpoint}/{ACCOUNT}/{name}?restype=container", method="PUT", headers=headers
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 201, response.status


def main() -> None:
    program = shutil.which("azurite-blob")
    if program is None:
        sys.exit("azurite-blob not found: npm install -g azurite")
    with tempfile.TemporaryDirectory() as workspace:
        emulator = subprocess.Popen(
            [
                program,
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                "0",
                "--inMemoryPersistence",
                "--silent",
                "--disableTelemetry",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=workspace,
            text=True,
        )
        try:
            endpoint = None
            for line in emulator.stdout:
                found = re.search(r"successfully listens on (http://\S+)", line)
                if found:
                    endpoint = found.group(1).rstrip("/")
                    break
            if endpoint is None:
                sys.exit(f"azurite-blob exited with {emulator.wait()} before listening")
            for name in sys.argv[1:]:
                create_container(endpoint, name)
            print(endpoint, flush=True)
            sys.stdin.read()
        finally:
            emulator.terminate()
            emulator.wait()


if __name__ == "__main__":
    main()
