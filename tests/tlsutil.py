"""Throw-away PKI for TLS tests: a CA, server and client certificates, and the bad cases.

Why: the archive simulator serves HTTPS with an optional required client certificate,
and the fault suite needs an expired server certificate and one from a CA the client
does not trust.  Uses ``cryptography`` when importable, else the ``openssl`` command.

``python3 tests/tlsutil.py DIR`` writes the files into DIR.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Pki:
    """Paths of every file made (PEM)."""

    dir: Path
    ca: Path  # trusted CA certificate
    server_cert: Path
    server_key: Path
    expired_cert: Path  # same names, validity ended in the past (same CA)
    expired_key: Path
    client_cert: Path
    client_key: Path
    wrong_ca: Path  # a second CA nobody trusts
    wrong_server_cert: Path  # valid server certificate signed by wrong_ca
    wrong_server_key: Path
    wrong_client_cert: Path  # client certificate signed by wrong_ca
    wrong_client_key: Path


def make_pki(directory: str | Path | None = None, names: tuple[str, ...] = NAMES,
             backend: str | None = None) -> Pki:
    """Make all certificates into ``directory`` (a new temp dir if None).

    ``backend``: ``"cryptography"`` or ``"openssl"``; default: the first available.
    """
    d = Path(directory or tempfile.mkdtemp(prefix="psprobe-pki-"))
    d.mkdir(parents=True, exist_ok=True)
    if backend is None:
        try:
            import cryptography  # noqa: F401
        except ImportError:
            backend = "openssl"
    issue = _OpenSSL(d).issue if backend == "openssl" else _Crypto().issue
    now = dt.datetime.now(dt.timezone.utc)
    year, past = (now - dt.timedelta(days=1), now + dt.timedelta(days=365)), \
        (now - dt.timedelta(days=30), now - dt.timedelta(days=1))
    issue(d, "ca", "psprobe test CA", None, year, ca=True)
    issue(d, "wrong-ca", "psprobe untrusted CA", None, year, ca=True)
    issue(d, "server", names[0], "ca", year, names=names)
    issue(d, "expired", names[0], "ca", past, names=names)
    issue(d, "client", "psprobe collector", "ca", year, client=True)
    issue(d, "wrong-server", names[0], "wrong-ca", year, names=names)
    issue(d, "wrong-client", "psprobe collector", "wrong-ca", year, client=True)
    return Pki(d, d / "ca.crt", d / "server.crt", d / "server.key", d / "expired.crt",
               d / "expired.key", d / "client.crt", d / "client.key", d / "wrong-ca.crt",
               d / "wrong-server.crt", d / "wrong-server.key", d / "wrong-client.crt",
               d / "wrong-client.key")


class _Crypto:
    """Issuing with the ``cryptography`` package."""

    def issue(self, d: Path, stem: str, cn: str, issuer: str | None,
              validity: tuple[dt.datetime, dt.datetime], names: tuple[str, ...] = (),
              ca: bool = False, client: bool = False) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        if issuer:
            signer = serialization.load_pem_private_key((d / f"{issuer}.key").read_bytes(), None)
            issuer_name = x509.load_pem_x509_certificate((d / f"{issuer}.crt").read_bytes()).subject
        else:
            signer, issuer_name = key, subject
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(validity[0]).not_valid_after(validity[1])
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                            critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                 signer.public_key()), critical=False))
        if ca:
            b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False,
                                              False), critical=True)
        else:
            usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if names:
            b = b.add_extension(x509.SubjectAlternativeName([_san(n) for n in names]),
                                critical=False)
        cert = b.sign(signer, hashes.SHA256())
        (d / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        (d / f"{stem}.key").chmod(0o600)


def _san(name: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


class _OpenSSL:
    """Issuing with the ``openssl`` command (``openssl ca`` for arbitrary validity)."""

    def __init__(self, d: Path) -> None:
        self.d = d

    def _run(self, *args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=self.d)

    def issue(self, d: Path, stem: str, cn: str, issuer: str | None,
              validity: tuple[dt.datetime, dt.datetime], names: tuple[str, ...] = (),
              ca: bool = False, client: bool = False) -> None:
        key, csr = f"{stem}.key", f"{stem}.csr"
        self._run("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
        self._run("req", "-new", "-key", key, "-subj", f"/CN={cn}", "-out", csr)
        ext = [f"basicConstraints=critical,CA:{'TRUE' if ca else 'FALSE'}",
               "subjectKeyIdentifier=hash", "authorityKeyIdentifier=keyid"]
        ext += ["keyUsage=critical,keyCertSign,cRLSign"] if ca else \
            [f"extendedKeyUsage={'clientAuth' if client else 'serverAuth'}"]
        if names:
            ext.append("subjectAltName=" + ",".join(
                f"{'IP' if _is_ip(n) else 'DNS'}:{n}" for n in names))
        db = d / f"{issuer or stem}.db"
        db.mkdir(exist_ok=True)
        (db / "index.txt").touch()
        conf = d / f"{stem}.cnf"
        conf.write_text(
            "[ca]\ndefault_ca=c\n[c]\n"
            f"database={db}/index.txt\nnew_certs_dir={db}\nrand_serial=yes\n"
            "default_md=sha256\npolicy=p\nunique_subject=no\n[p]\ncommonName=supplied\n"
            "[x]\n" + "\n".join(ext) + "\n")
        fmt = "%Y%m%d%H%M%SZ"
        sign = ["-selfsign", "-keyfile", key] if issuer is None else \
            ["-cert", f"{issuer}.crt", "-keyfile", f"{issuer}.key"]
        self._run("ca", "-batch", "-notext", "-config", str(conf), "-extensions", "x",
                  "-startdate", validity[0].strftime(fmt), "-enddate", validity[1].strftime(fmt),
                  *sign, "-in", csr, "-out", f"{stem}.crt")
        (d / key).chmod(0o600)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


if __name__ == "__main__":
    print(make_pki(sys.argv[1] if len(sys.argv) > 1 else None).dir)
