"""A second gateway beside the stack's open one: API keys required, TLS on (a self-signed
certificate made here) for gRPC and HTTP alike; and keys made with `llmesh keys`."""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.common.audit import AuditEntry
from llmesh.stack import processes, stack
from llmesh.stack.layout import StackLayout, free_port


@dataclass(frozen=True)
class KeyedGateway:
    name: str
    address: str  # gRPC, TLS
    http_url: str  # https://127.0.0.1:PORT/v1
    cert: Path  # the certificate to trust
    metrics: str  # its Prometheus endpoint's address


def self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "gateway.crt", folder / "gateway.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def health(address: str, ca: Path) -> str:
    credentials = grpc.ssl_channel_credentials(ca.read_bytes())
    try:
        with grpc.secure_channel(address, credentials) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError:
        return "UNREACHABLE"


def start_keyed_gateway(mesh: StackLayout, name: str, folder: Path, **env: str) -> KeyedGateway:
    """Start gateway `name` with keys required and TLS on (`env`: more LLMESH_* settings); stop it
    with processes.stop(mesh, name)."""
    cert, key = self_signed(folder)
    port, http_port, metrics_port = free_port(), free_port(), free_port()
    settings = stack.service_env(mesh, "gateway") | {
        "LLMESH_GRPC_PORT": str(port),
        "LLMESH_HTTP_PORT": str(http_port),
        "LLMESH_METRICS_PORT": str(metrics_port),
        "LLMESH_GATEWAY_ID": name,
        "LLMESH_API_KEYS_REQUIRED": "true",
        "LLMESH_TLS_CERT_FILE": str(cert),
        "LLMESH_TLS_KEY_FILE": str(key),
    }
    processes.start(mesh, name, [sys.executable, "-m", "services.gateway"], settings | env)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while health(address, cert) != "SERVING":  # health is open: probes carry no key
        assert time.monotonic() < deadline, f"gateway {name} did not start"
        time.sleep(0.2)
    return KeyedGateway(name, address, f"https://127.0.0.1:{http_port}/v1", cert, f"127.0.0.1:{metrics_port}")


def cli(mesh: StackLayout, command: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`llmesh <command> *args` against the stack's Redis."""
    return subprocess.run(
        [sys.executable, "-m", "llmesh.cli", command, *args, "--redis-url", mesh.redis_url],
        capture_output=True,
        text=True,
        check=check,
        timeout=60,
    )


def keys_cli(mesh: StackLayout, *args: str) -> str:
    return cli(mesh, "keys", *args).stdout


def audit_entries(mesh: StackLayout, *args: str) -> list[AuditEntry]:
    """`llmesh audit --json` (with `args`), parsed."""
    return [AuditEntry.model_validate_json(line) for line in cli(mesh, "audit", "--json", *args).stdout.splitlines()]


def new_key(mesh: StackLayout, *args: str) -> tuple[str, str]:
    """(key id, secret) of a key made with the CLI."""
    secret = keys_cli(mesh, "create", "--name", "e2e", *args).strip().splitlines()[-1]
    return secret.split("_")[1], secret
