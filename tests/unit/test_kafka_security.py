"""Kafka TLS and SASL (KafkaSettings): what is accepted, and the arguments every Kafka client of the
mesh gets from it (aiokafka directly, FastStream's broker through its `security`)."""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from faststream.kafka.security import parse_security
from pydantic import ValidationError

from llmesh.common import kafka
from llmesh.common.settings import KafkaSettings, kafka_from_env, load_settings
from services.tokenize.settings import TokenizeSettings


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, issuer_key: ec.EllipticCurvePrivateKey, ca: bool):
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA, and a client certificate it signed whose key is encrypted with 'hunter2'."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key, client_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("llmesh test CA", ca_key, "llmesh test CA", ca_key, ca=True)
    client = _certificate("llmesh-gateway", client_key, "llmesh test CA", ca_key, ca=False)
    files = {"ca": folder / "ca.crt", "cert": folder / "user.crt", "key": folder / "user.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(client.public_bytes(serialization.Encoding.PEM))
    encryption = serialization.BestAvailableEncryption(b"hunter2")
    files["key"].write_bytes(client_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    return files


def test_plaintext_is_the_default_and_adds_nothing():
    assert KafkaSettings().client_kwargs() == {"security_protocol": "PLAINTEXT"}
    assert kafka.broker_security(KafkaSettings()) is None


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"security_protocol": "SASL_SSL"}, "needs sasl_mechanism, sasl_username and sasl_password"),
        ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u"}, "needs sasl_mechanism"),
        ({"sasl_mechanism": "PLAIN", "sasl_username": "u", "sasl_password": "p"}, "need security_protocol SASL_"),
        ({"security_protocol": "SSL", "ssl_certfile": "user.crt"}, "set both ssl_certfile and ssl_keyfile"),
        ({"security_protocol": "SSL", "ssl_password": "x"}, "ssl_password is the password of ssl_keyfile"),
        ({"ssl_cafile": "ca.crt"}, "need security_protocol SSL or SASL_SSL"),
        ({"security_protocol": "TLS"}, "security_protocol"),
        (
            {"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI", "sasl_username": "u", "sasl_password": "p"},
            "sasl_mechanism",
        ),
    ],
)
def test_contradictory_settings_are_refused(fields, error):
    with pytest.raises(ValidationError, match=error):
        KafkaSettings(**fields)


def test_ssl_loads_the_ca_and_the_client_certificate(pki):
    settings = KafkaSettings(
        security_protocol="SSL", ssl_cafile=pki["ca"], ssl_certfile=pki["cert"], ssl_keyfile=pki["key"], ssl_password="hunter2"
    )
    kwargs = settings.client_kwargs()
    assert set(kwargs) == {"security_protocol", "ssl_context"} and kwargs["security_protocol"] == "SSL"
    context: ssl.SSLContext = kwargs["ssl_context"]
    assert [dict(pair[0] for pair in ca["subject"])["commonName"] for ca in context.get_ca_certs()] == ["llmesh test CA"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    security = kafka.broker_security(settings)
    assert security is not None and security.use_ssl and security.ssl_context is not None
    assert parse_security(security)["security_protocol"] == "SSL"


def test_a_wrong_key_password_fails_when_the_client_is_made(pki):
    settings = KafkaSettings(
        security_protocol="SSL", ssl_cafile=pki["ca"], ssl_certfile=pki["cert"], ssl_keyfile=pki["key"], ssl_password="nope"
    )
    with pytest.raises(ssl.SSLError):
        settings.client_kwargs()


def test_hostname_checking_can_be_turned_off_but_not_the_chain(pki):
    context = KafkaSettings(security_protocol="SSL", ssl_cafile=pki["ca"], ssl_check_hostname=False).client_kwargs()[
        "ssl_context"
    ]
    assert not context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED


def test_ssl_without_a_ca_trusts_the_systems():
    context = KafkaSettings(security_protocol="SSL").client_kwargs()["ssl_context"]
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
@pytest.mark.parametrize("protocol", ["SASL_PLAINTEXT", "SASL_SSL"])
def test_sasl_gives_every_client_the_same_login(mechanism, protocol, pki):
    settings = KafkaSettings(
        security_protocol=protocol,
        ssl_cafile=pki["ca"] if protocol == "SASL_SSL" else None,
        sasl_mechanism=mechanism,
        sasl_username="llmesh-gateway",
        sasl_password="s3cret",
    )
    assert "s3cret" not in repr(settings), "the password is a secret"
    kwargs = settings.client_kwargs()
    assert kwargs["security_protocol"] == protocol
    assert (kwargs["sasl_mechanism"], kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == (
        mechanism,
        "llmesh-gateway",
        "s3cret",
    )
    assert ("ssl_context" in kwargs) == (protocol == "SASL_SSL")
    broker_kwargs = parse_security(kafka.broker_security(settings))  # what FastStream hands aiokafka
    assert {k: v for k, v in broker_kwargs.items() if k != "ssl_context"} == {
        k: v for k, v in kwargs.items() if k != "ssl_context"
    }
    assert (broker_kwargs["ssl_context"] is not None) == (protocol == "SASL_SSL")


def test_the_broker_of_every_service_gets_the_security(pki):
    settings = KafkaSettings(
        security_protocol="SASL_SSL", ssl_cafile=pki["ca"], sasl_mechanism="SCRAM-SHA-512", sasl_username="u", sasl_password="p"
    )
    connection = kafka.make_broker(settings, "llmesh-test")._connection_kwargs
    assert connection["security_protocol"] == "SASL_SSL" and connection["sasl_mechanism"] == "SCRAM-SHA-512"
    assert connection["sasl_plain_username"] == "u" and isinstance(connection["ssl_context"], ssl.SSLContext)


def test_services_and_the_cli_read_the_environment(pki, monkeypatch):
    env = {
        "LLMESH_KAFKA__BOOTSTRAP": "kafka:9093",
        "LLMESH_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "LLMESH_KAFKA__SSL_CAFILE": str(pki["ca"]),
        "LLMESH_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
        "LLMESH_KAFKA__SASL_USERNAME": "llmesh-tokenize",
        "LLMESH_KAFKA__SASL_PASSWORD": "from-the-secret",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    service = load_settings(TokenizeSettings, [], "tokenize").kafka
    assert service.security_protocol == "SASL_SSL" and service.sasl_password.get_secret_value() == "from-the-secret"
    cli = kafka_from_env("other:9093")
    assert cli.bootstrap == "other:9093" and cli.sasl_username == "llmesh-tokenize" and cli.ssl_cafile == pki["ca"]
    assert kafka_from_env().bootstrap == "kafka:9093"
