"""Real DICOM peers for tests: DCMTK storescp and Orthanc, on free ports under the test's tmp dir.

Registered as a pytest plugin in the root conftest.py (`pytest_plugins = ["tests.peers"]`), so any
test can ask for the fixtures:

- `storescp`: a running DCMTK `/usr/bin/storescp` (accepts every transfer syntax, writes files
  bit-preserved, one process per association) -> `StoreScp` (port, aet, out_dir, files(), sop_uids()).
- `storescp_factory`: make more, or make one without starting it (`start=False`, to test a target
  that comes up later).
- `orthanc`: a running Orthanc with its own JSON config, DICOM/HTTP ports and storage -> `Orthanc`
  (dicom_port, aet, http_url, instances(), sop_uids(), file(id), file_by_sop(uid)).
- `orthanc_factory`: the same, several or not started.
- `make_series(out_dir, n, size=64, ...)`: synthetic CT files (bench/synthetic.py).
- `clone_instances(template, out_dir, n)`: n copies of one file with new SOP Instance UIDs (fast).
- `make_tls_files(dir)`: a test CA with server/client certificates; a TLS storescp is
  `storescp_factory(extra_args=StoreScp.tls_args(files))` (requires a client certificate).

Helpers fail loudly when a binary is missing: tests must not skip silently.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread

from bench.synthetic import write_series
from shared.natsserver import free_port, wait_port

STORESCP = "/usr/bin/storescp"
ORTHANC = "/usr/sbin/Orthanc"


def make_series(out_dir: Path, n: int, *, size: int = 64, studies: int = 1, series_per_study: int = 1,
                ) -> list[Path]:
    """Write a synthetic CT series (n slices of size x size) and return the files, sorted."""
    write_series(out_dir, n, size=size, studies=studies, series_per_study=series_per_study)
    return sorted(out_dir.glob("*.dcm"))


def clone_instances(template: Path, out_dir: Path, n: int) -> list[Path]:
    """n copies of one DICOM file that differ only in SOP Instance UID, fast (bytes, no pydicom write).

    For tests that need many instances (hundreds) quickly; make_series takes ~15 ms per file.
    The new UIDs keep the template's length (its last 6 digits replaced), so every element length
    in the file stays valid.
    """
    data = template.read_bytes()
    uid = str(dcmread(template, stop_before_pixels=True).SOPInstanceUID)
    if len(uid.rsplit(".", 1)[-1]) < 7:
        raise ValueError(f"template UID {uid} has too short a last component to vary")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        new_uid = f"{uid[:-6]}{100000 + i:06d}"
        path = out_dir / f"clone_{i:05d}.dcm"
        path.write_bytes(data.replace(uid.encode(), new_uid.encode()))
        paths.append(path)
    return paths


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the peer closed this (non-blocking) connection."""
    with contextlib.suppress(BlockingIOError):
        try:
            return sock.recv(1) == b""
        except ConnectionResetError:
            return True
    return False


def pdu_item(item_type: int, payload: bytes) -> bytes:
    """An item of an A-ASSOCIATE PDU: type, reserved, 16-bit length, payload (PS3.8 9.3.2)."""
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def associate_rq(called: str = "CADUCEUS", calling: str = "HOSTILE", contexts: bytes | None = None) -> bytes:
    """A valid A-ASSOCIATE-RQ proposing Verification (PS3.8 9.3.2), or the given context items."""
    context = contexts if contexts is not None else pdu_item(
        0x20, bytes([1, 0, 0, 0]) + pdu_item(0x30, b"1.2.840.10008.1.1") + pdu_item(0x40, b"1.2.840.10008.1.2"))
    user = pdu_item(0x50, pdu_item(0x51, struct.pack(">I", 16384)) + pdu_item(0x52, b"1.2.3.4"))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + b"\0" * 32 +
            pdu_item(0x10, b"1.2.840.10008.3.1.1.1") + context + user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def open_connections(port: int, count: int, timeout: float = 5.0,
                     on_connect: Callable[[socket.socket, int], None] | None = None) -> list[socket.socket]:
    """`count` TCP connections to 127.0.0.1:`port` started at once (non-blocking, through epoll:
    select() stops at descriptor 1024); returns those connected within `timeout`, the rest closed.
    `on_connect(sock, n)` runs as the n-th one connects (e.g. to send a partial PDU)."""
    pending = []
    waiting = selectors.DefaultSelector()
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        pending.append(sock)
        waiting.register(sock, selectors.EVENT_WRITE)
    connected: list[socket.socket] = []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for key, _ in waiting.select(0.5):
            sock = key.fileobj  # type: ignore[assignment]
            waiting.unregister(sock)
            pending.remove(sock)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                connected.append(sock)
                if on_connect is not None:
                    on_connect(sock, len(connected))
    waiting.close()
    for sock in pending:
        sock.close()
    return connected


def make_tls_files(out_dir: Path) -> TlsFiles:
    """A throw-away CA and a server (SAN 127.0.0.1/localhost) and client certificate it signed (PEM)."""
    out_dir.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["/usr/bin/openssl", *args], check=True, capture_output=True, cwd=out_dir)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=caduceus-test-ca")
    for name, san in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN=caduceus-test-{name}")
        (out_dir / f"{name}.ext").write_text(san + "\n" if san else "basicConstraints=CA:FALSE\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return TlsFiles(out_dir / "ca.pem", out_dir / "server.pem", out_dir / "server.key",
                    out_dir / "client.pem", out_dir / "client.key")


def _stop_process_group(process: subprocess.Popen[bytes] | None, timeout: float = 5.0) -> None:
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout)


# ---------------------------------------------------------------- DCMTK storescp

@dataclass
class StoreScp:
    """DCMTK storescp: `+xa` accepts all transfer syntaxes it knows (no transcoding on our side is
    needed), `+B` writes the data set exactly as received, `--fork` serves parallel associations."""

    out_dir: Path
    port: int = field(default_factory=free_port)
    aet: str = "STORESCP"
    host: str = "127.0.0.1"
    extra_args: list[str] = field(default_factory=list)
    log_file: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    accept_all: bool = True  # +xa; off for a configuration file (`-xf FILE PROFILE` in extra_args)

    def start(self) -> StoreScp:
        if not Path(STORESCP).is_file():
            raise FileNotFoundError(f"{STORESCP} missing: apt-get install dcmtk")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        args = [STORESCP, "--fork", *(["+xa"] if self.accept_all else []), "+B", "-aet", self.aet,
                "-od", str(self.out_dir), *self.extra_args, str(self.port)]
        log = open(self.log_file or self.out_dir.parent / f"storescp-{self.port}.log", "ab")  # noqa: SIM115
        # TCP_NODELAY=1: DCMTK otherwise stalls on delayed ACKs with small PDUs.
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, "TCP_NODELAY": "1"})
        log.close()
        wait_port(self.host, self.port, timeout=10)
        return self

    @staticmethod
    def tls_args(files: TlsFiles) -> list[str]:
        """storescp arguments for DICOM TLS: our server certificate, peers must present one from the CA."""
        return ["+tls", str(files.server_key), str(files.server_cert), "-pw", "+cf", str(files.ca), "-rc"]

    def stop(self) -> None:
        _stop_process_group(self.process)
        self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def files(self) -> list[Path]:
        # storescp writes "<modality>.<sop uid>" files; skip anything still being written.
        return sorted(p for p in self.out_dir.iterdir() if p.is_file() and not p.name.endswith(".tmp")) \
            if self.out_dir.is_dir() else []

    def sop_uids(self) -> set[str]:
        return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in self.files()}

    def datasets(self) -> dict[str, Any]:
        """SOP Instance UID -> dataset (with pixel data, not decoded until accessed)."""
        return {str(ds.SOPInstanceUID): ds for ds in (dcmread(p) for p in self.files())}

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Path]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            files = self.files()
            if len(files) >= count:
                return files
            time.sleep(0.1)
        raise TimeoutError(f"storescp on {self.port} has {len(self.files())} of {count} files")


# ---------------------------------------------------------------- Orthanc

@dataclass
class Orthanc:
    root: Path
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    aet: str = "ORTHANC"
    host: str = "127.0.0.1"
    config_overrides: dict[str, Any] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def config(self) -> dict[str, Any]:
        return {
            "Name": f"caduceus-test-{self.dicom_port}",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "UnknownSopClassAccepted": True,
            "AcceptedTransferSyntaxes": ["1.2.840.10008.1.*"],
            "OverwriteInstances": True,
            "SaveJobs": False,
            "Plugins": [],
            "StableAge": 1,
            **self.config_overrides,
        }

    def start(self) -> Orthanc:
        if not Path(ORTHANC).is_file():
            raise FileNotFoundError(f"{ORTHANC} missing: apt-get install orthanc")
        self.root.mkdir(parents=True, exist_ok=True)
        config_file = self.root / "orthanc.json"
        config_file.write_text(json.dumps(self.config(), indent=2))
        log = open(self.root / "orthanc.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen([ORTHANC, str(config_file)], stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True, cwd=self.root)
        log.close()
        wait_port(self.host, self.http_port, timeout=30)
        wait_port(self.host, self.dicom_port, timeout=30)
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.http_url}/system", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"Orthanc REST on {self.http_port} not ready")

    def stop(self) -> None:
        # A throw-away test instance: no need for Orthanc's multi-second graceful shutdown.
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.http_url}{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def instances(self) -> list[str]:
        """Orthanc ids of every stored instance."""
        return list(self.get("/instances"))

    def sop_uids(self) -> set[str]:
        return set(self.instances_by_sop())

    def instances_by_sop(self) -> dict[str, str]:
        """SOP Instance UID -> Orthanc instance id."""
        found = self.get("/instances?expand")
        return {item["MainDicomTags"]["SOPInstanceUID"]: item["ID"] for item in found}

    def file(self, instance_id: str) -> bytes:
        response = httpx.get(f"{self.http_url}/instances/{instance_id}/file", timeout=30)
        response.raise_for_status()
        return response.content

    def file_by_sop(self, sop_uid: str) -> bytes:
        return self.file(self.instances_by_sop()[sop_uid])

    def wait_for(self, count: int, timeout: float = 30.0) -> set[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            uids = self.sop_uids()
            if len(uids) >= count:
                return uids
            time.sleep(0.2)
        raise TimeoutError(f"Orthanc on {self.dicom_port} has {len(self.sop_uids())} of {count} instances")


# ---------------------------------------------------------------- fixtures

@pytest.fixture
def storescp_factory(tmp_path: Path) -> Iterator[Callable[..., StoreScp]]:
    made: list[StoreScp] = []

    def make(*, start: bool = True, aet: str = "STORESCP", extra_args: list[str] | None = None,
             port: int | None = None, accept_all: bool = True) -> StoreScp:
        peer = StoreScp(tmp_path / f"storescp-{len(made)}", aet=aet, extra_args=extra_args or [],
                        accept_all=accept_all)
        if port:
            peer.port = port
        made.append(peer)
        return peer.start() if start else peer

    yield make
    for peer in made:
        peer.stop()


@pytest.fixture
def storescp(storescp_factory: Callable[..., StoreScp]) -> StoreScp:
    return storescp_factory()


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., Orthanc]]:
    made: list[Orthanc] = []

    def make(*, start: bool = True, aet: str = "ORTHANC", **overrides: Any) -> Orthanc:
        peer = Orthanc(tmp_path / f"orthanc-{len(made)}", aet=aet, config_overrides=overrides)
        made.append(peer)
        return peer.start() if start else peer

    yield make
    for peer in made:
        peer.stop()


@pytest.fixture
def orthanc(orthanc_factory: Callable[..., Orthanc]) -> Orthanc:
    return orthanc_factory()
