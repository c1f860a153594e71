"""HTTPS through Serve's own proxy (`router.tls`), as a new user runs it with the CLI: a self-signed certificate
made here (its key encrypted, the password in an environment variable), `modelfleet up` and `deploy`, the official
`openai` client over https, plain http refused, and `modelfleet models add` redeploying over https."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cluster.local import free_port

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "cluster.cli"]
ROOT = Path(__file__).resolve().parents[2]
PASSWORD_ENV = "MF_TEST_TLS_KEY_PASSWORD"
PASSWORD = "correct horse battery staple"
REPLICA = "x-modelfleet-replica"
# What the test session set for itself (its cluster home, token, caches, Ray's temp folder): a new user has none.
_SESSION_VARS = ("MODELFLEET_", "RAY_AUTH_", "RAY_TMPDIR", "XDG_")


@pytest.fixture
def home() -> Iterator[Path]:
    """A fresh, empty HOME (short: Ray's unix sockets live under it), with the local cluster stopped at the end."""
    root = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))
    (root / "h").mkdir()
    (root / "t").mkdir()
    yield root / "h"
    subprocess.run([*CLI, "down"], env=_env(root / "h"), cwd=ROOT, timeout=120, check=False)
    shutil.rmtree(root, ignore_errors=True)


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SESSION_VARS)}
    return {**env, "HOME": str(home), "TMPDIR": str(home.parent / "t"), "PYTHONUNBUFFERED": "1", PASSWORD_ENV: PASSWORD}


def _run(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=_env(home), cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, signed by its own key (written encrypted with PASSWORD)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "modelfleet test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = folder / "cert.pem", folder / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(PASSWORD.encode()),
        )
    )
    keyfile.chmod(0o600)
    return certfile, keyfile


def test_https_with_the_openai_client(home: Path) -> None:
    certfile, keyfile = _self_signed(home)
    port = free_port()
    config = yaml.safe_load((ROOT / "deployments" / "configs" / "echo.yaml").read_text())
    config["router"] = {
        "port": port,
        "tls": {"certfile": str(certfile), "keyfile": str(keyfile), "keyfile_password_env": PASSWORD_ENV},
    }
    path = home / "tls.yaml"
    path.write_text(yaml.safe_dump(config))

    up = _run(home, "up")
    assert up.returncode == 0, up.stdout + up.stderr
    deployed = _run(home, "deploy", str(path))
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    base = f"https://127.0.0.1:{port}"
    assert f"ready: {base}/v1" in deployed.stdout

    trusted = ssl.create_default_context(cafile=str(certfile))
    http = httpx.Client(verify=trusted, timeout=30)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, http_client=http)
    raw = client.chat.completions.with_raw_response.create(
        model="echo", messages=[{"role": "user", "content": "over tls"}]
    )
    assert raw.parse().choices[0].message.content == "over tls"
    echo_replica = raw.headers[REPLICA]
    stream = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "a b c"}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "a b c"
    assert len(client.embeddings.create(model="echo-embed", input="x").data[0].embedding) == 16

    # Plain HTTP on the same port gets no answer, and a client that does not trust the certificate refuses it.
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{base}/healthz", timeout=10)

    # Serve's HTTP options are fixed when it starts: a config without TLS is refused on this cluster, by name.
    plain = home / "plain.yaml"
    plain.write_text(yaml.safe_dump({**config, "router": {"port": port}}))
    refused = _run(home, "deploy", str(plain))
    assert refused.returncode == 1
    assert "router.tls asks for plain HTTP" in refused.stderr and "modelfleet down" in refused.stderr

    # A live change over https: `models add` redeploys the running config; the untouched model keeps its replica.
    added = _run(
        home, "models", "add", "--spec", "{id: added, task: generate, engine: echo, resources: {num_cpus: 0.25}}"
    )
    assert added.returncode == 0, added.stdout + added.stderr
    assert f"ready: {base}/v1  (models: echo, echo-embed, added)" in added.stdout
    assert [m.id for m in client.models.list()] == ["echo", "echo-embed", "added"]
    assert client.completions.create(model="added", prompt="new").choices[0].text == "new"
    again = client.chat.completions.with_raw_response.create(model="echo", messages=[{"role": "user", "content": "x"}])
    assert again.headers[REPLICA] == echo_replica
    missing = _run(home, "models", "remove", "nope")
    assert missing.returncode == 1 and "no model 'nope' is served" in missing.stderr
    http.close()
