"""Test certificates made at test time with the `openssl` command: a CA, a server certificate for
127.0.0.1 / localhost and a client certificate signed by it, and a second, unrelated CA."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "2"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # trusts nothing above
    other_key: Path  # a valid key that belongs to no certificate here


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _new_key_args(key: str) -> list[str]:
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key]


def _self_signed_ca(out: Path, name: str) -> None:
    _openssl(
        "req", "-x509", *_new_key_args(f"{name}.key"), "-out", f"{name}.pem", "-days", DAYS,
        "-subj", f"/CN=vqs test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=out,
    )


def _signed(out: Path, name: str, extensions: str) -> None:
    (out / f"{name}.ext").write_text(extensions)
    _openssl("req", "-new", *_new_key_args(f"{name}.key"), "-out", f"{name}.csr",
             "-subj", f"/CN=vqs test {name}", cwd=out)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", DAYS, "-extfile", f"{name}.ext",
             cwd=out)


def make_pki(out: Path) -> Pki:
    if shutil.which("openssl") is None:
        raise RuntimeError("the `openssl` command is needed to make test certificates")
    out.mkdir(parents=True, exist_ok=True)
    _self_signed_ca(out, "ca")
    _self_signed_ca(out, "other_ca")
    _signed(out, "server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _signed(out, "client", "extendedKeyUsage=clientAuth\n")
    return Pki(
        ca=out / "ca.pem", server_cert=out / "server.pem", server_key=out / "server.key",
        client_cert=out / "client.pem", client_key=out / "client.key",
        other_ca=out / "other_ca.pem", other_key=out / "other_ca.key",
    )
