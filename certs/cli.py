"""``hbone-proxy certs init|issue|inspect``: the mesh CA from the command line.

Errors print one line on stderr and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs._pem import load_certs, read_pem_file, spiffe_uris, utc
from certs.ca import ROOT_CERT_FILE, ROOT_KEY_FILE, ROOT_TTL, WORKLOAD_TTL, MeshCA
from certs.errors import CertError
from certs.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeError, SpiffeId

EXIT_USAGE = 2  # bad input of any kind: the argparse convention, used by every hbone-proxy command

_DURATION_PART = re.compile(r"(\d+)([smhd])")
_UNIT = {"s": timedelta(seconds=1), "m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1)}


def parse_duration(text: str) -> timedelta:
    """``30s``, ``15m``, ``24h``, ``7d``, or a sum like ``1h30m`` (Go-style, as Istio flags take)."""
    if not isinstance(text, str) or not text or not re.fullmatch(r"(?:\d+[smhd])+", text):
        raise CertError(f"invalid duration {text!r}: use a number and a unit s, m, h or d, e.g. 30s, 15m, 24h, 7d")
    total = sum((int(n) * _UNIT[u] for n, u in _DURATION_PART.findall(text)), timedelta())
    if total <= timedelta(0):
        raise CertError(f"invalid duration {text!r}: must be greater than zero")
    return total


def format_duration(d: timedelta) -> str:
    """Largest two units: ``3d4h``, ``23h59m``, ``45s``."""
    secs = int(abs(d).total_seconds())
    parts = [(secs // 86400, "d"), (secs % 86400 // 3600, "h"), (secs % 3600 // 60, "m"), (secs % 60, "s")]
    shown = [f"{n}{u}" for n, u in parts if n][:2]
    return "".join(shown) or "0s"


def format_serial(n: int) -> str:
    """Colon-separated hex bytes, as ``openssl x509 -text`` shows them (RFC 5280 serials are positive;
    a broken certificate's negative one is shown with a sign rather than crashing)."""
    sign, n = ("-", -n) if n < 0 else ("", n)
    return sign + ":".join(f"{b:02x}" for b in n.to_bytes((n.bit_length() + 7) // 8 or 1, "big"))


def _now_arg(text: str | None) -> datetime:
    if text is None:
        return datetime.now(timezone.utc)
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise CertError(f"invalid --now {text!r}: use ISO 8601, e.g. 2030-01-02T03:04:05Z") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _fmt_time(t: datetime) -> str:
    return utc(t).strftime("%Y-%m-%d %H:%M:%S UTC")


# ------------------------------------------------------------------ commands


def cmd_init(args: argparse.Namespace) -> int:
    ca = MeshCA.init(args.dir, trust_domain=args.trust_domain, now=_now_arg(args.now), ttl=args.ttl)
    d = Path(args.dir)
    print(f"created mesh CA for trust domain {ca.trust_domain} in {d}")
    print(f"  {d / ROOT_CERT_FILE}  root certificate: the trust bundle (--ca)")
    print(f"  {d / ROOT_KEY_FILE}  root key (mode 0600): keep it private")
    print(f"  valid until {_fmt_time(ca.root_cert.not_valid_after_utc)}")
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    ca = MeshCA.load(args.dir)
    try:
        spiffe = SpiffeId(ca.trust_domain, args.namespace, args.service_account)
    except SpiffeError as err:
        raise CertError(f"invalid identity: {err}") from None
    if args.out.endswith(("/", "\\")) or Path(args.out).name in ("", ".", ".."):
        raise CertError(f"--out {args.out!r} must be a file prefix such as ./reviews (writes ./reviews-cert.pem and ./reviews-key.pem)")
    issued = ca.issue(spiffe, now=_now_arg(args.now), ttl=args.ttl)
    cert_path, key_path = issued.write(args.out)
    print(f"issued {spiffe}")
    print(f"  valid {_fmt_time(issued.not_before)} to {_fmt_time(issued.not_after)}")
    print(f"  {cert_path}  certificate (--cert)")
    print(f"  {key_path}  private key (--key, mode 0600)")
    print(f"  {Path(args.dir) / ROOT_CERT_FILE}  trust bundle (--ca)")
    return 0


def _key_desc(cert: x509.Certificate) -> str:
    pub = cert.public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ECDSA P-256", "secp384r1": "ECDSA P-384", "secp521r1": "ECDSA P-521"}.get(pub.curve.name, f"ECDSA {pub.curve.name}")
    if isinstance(pub, rsa.RSAPublicKey):
        return f"RSA {pub.key_size}"
    if isinstance(pub, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return type(pub).__name__.replace("PublicKey", "")
    return type(pub).__name__


_EKU_NAMES = {ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth", ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth"}
# cryptography's KeyUsage field → the RFC 5280 §4.2.1.3 name users know from `openssl x509 -text`
_KU_FIELDS = {
    "digital_signature": "digitalSignature", "content_commitment": "nonRepudiation", "key_encipherment": "keyEncipherment",
    "data_encipherment": "dataEncipherment", "key_agreement": "keyAgreement", "key_cert_sign": "keyCertSign", "crl_sign": "cRLSign",
}


def _ext(cert: x509.Certificate, cls):
    try:
        return cert.extensions.get_extension_for_class(cls).value
    except (x509.ExtensionNotFound, ValueError):
        return None


def describe(cert: x509.Certificate, now: datetime) -> list[tuple[str, str]]:
    """The rows ``certs inspect`` prints for one certificate (pure: cert and clock in, rows out)."""
    bc = _ext(cert, x509.BasicConstraints)
    is_ca = bool(bc and bc.ca)
    uris = spiffe_uris(cert)
    if len(uris) == 1:
        try:
            identity = str(SpiffeId.parse(uris[0]))
        except SpiffeError as err:
            identity = f"(invalid: {err})"
    elif uris:
        identity = f"(ambiguous: {len(uris)} SPIFFE URIs: {', '.join(uris)})"
    else:
        identity = "- (CA certificate)" if is_ca else "(none: no spiffe:// URI SAN)"
    san = _ext(cert, x509.SubjectAlternativeName)
    other_sans = [str(v) for v in san.get_values_for_type(x509.DNSName)] if san else []
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        status = f"NOT YET VALID (starts in {format_duration(start - now)})"
    elif now >= end:
        status = f"EXPIRED ({format_duration(now - end)} ago)"
    else:
        status = f"valid (expires in {format_duration(end - now)}; renew at half-life {_fmt_time(start + (end - start) / 2)})"
    ku = _ext(cert, x509.KeyUsage)
    usage = [name for f, name in _KU_FIELDS.items() if ku is not None and getattr(ku, f)]
    eku = _ext(cert, x509.ExtendedKeyUsage)
    if eku is not None:
        usage += [_EKU_NAMES.get(o, o.dotted_string) for o in eku]
    rows = [
        ("identity", identity),
        ("subject", cert.subject.rfc4514_string() or "(empty)"),
        ("issuer", cert.issuer.rfc4514_string() or "(empty)"),
        ("serial", format_serial(cert.serial_number)),
        ("not before", _fmt_time(start)),
        ("not after", _fmt_time(end)),
        ("status", status),
        ("key", _key_desc(cert)),
        ("usage", ", ".join(usage) or "(unrestricted)"),
        ("CA", "yes" if is_ca else "no"),
    ]
    if other_sans:
        rows.insert(1, ("DNS names", ", ".join(other_sans)))
    return rows


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.file)
    certs = load_certs(read_pem_file(path), str(path))
    now = utc(_now_arg(args.now))
    for i, cert in enumerate(certs):
        if i:
            print()
        title = f"{path}" + (f" (certificate {i + 1} of {len(certs)})" if len(certs) > 1 else "")
        print(title)
        rows = describe(cert, now)
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"  {k:<{width}}  {v}")
    return 0


# ------------------------------------------------------------------ wiring


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line + usage, exit 2 (argparse's own convention, kept)
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _duration(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except CertError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hbone-proxy certs", description="A small mesh CA: SPIFFE workload certificates for HBONE mTLS.")
    sub = p.add_subparsers(dest="command", metavar="{init,issue,inspect}", parser_class=_Parser)
    sub.required = True
    now_help = "pretend the time is NOW (ISO 8601; for tests and reproducible examples)"

    init = sub.add_parser("init", help="create a mesh CA (ECDSA P-256 root) in a directory")
    init.add_argument("--dir", required=True, help="CA directory (created 0700; must not hold a CA already)")
    init.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN, help="SPIFFE trust domain (default: %(default)s)")
    init.add_argument("--ttl", type=_duration, default=ROOT_TTL, help="root validity, e.g. 3650d (default: 10 years)")
    init.add_argument("--now", help=now_help)
    init.set_defaults(func=cmd_init)

    issue = sub.add_parser("issue", help="issue a workload certificate spiffe://TD/ns/NS/sa/SA")
    issue.add_argument("--dir", required=True, help="CA directory made by `certs init`")
    issue.add_argument("--namespace", required=True)
    issue.add_argument("--service-account", required=True)
    issue.add_argument("--ttl", type=_duration, default=WORKLOAD_TTL, help="validity: 30s, 15m, 24h, 7d (default: 24h)")
    issue.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX-cert.pem and PREFIX-key.pem")
    issue.add_argument("--now", help=now_help)
    issue.set_defaults(func=cmd_issue)

    inspect = sub.add_parser("inspect", help="show a PEM certificate (or chain): identity, issuer, serial, validity")
    inspect.add_argument("file", metavar="FILE")
    inspect.add_argument("--now", help=now_help)
    inspect.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return int(args.func(args) or 0)
    except CertError as err:
        print(f"hbone-proxy certs {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `... | head`: the work is done, only the report was cut short
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so the interpreter's final flush is silent
        return 0
    except OSError as err:  # e.g. --out into a read-only directory
        where = f"{err.filename}: " if err.filename else ""
        print(f"hbone-proxy certs {args.command}: error: {where}{err.strerror or err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
