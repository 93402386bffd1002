"""Scan forkgw's default TLS settings with a third-party scanner (sslscan).

What is scanned: a throwaway ECDSA P-256 certificate and a conf whose only TLS
lines are `listen ... ssl`, `ssl_certificate` and `ssl_certificate_key`, so
the protocols, ciphers and groups sslscan finds are forkgw's defaults
(`ssl_protocols TLSv1.2 TLSv1.3; ssl_ciphers HIGH:!aNULL:!MD5;`) as OpenSSL
applies them.

The verdict: no protocol older than TLS 1.2 enabled, and no weak cipher
accepted (NULL, EXPORT, RC4, DES or 3DES, MD5, anonymous, or under 128 bits).
The exit status is 1 when it fails, 2 when the scan could not be run.

forkgw runs in its own session and its process group is killed at the end,
whatever happens; sslscan is installed with apt-get if it is missing.

    python scripts/tls_scan.py
    python scripts/tls_scan.py --raw       # sslscan's own output too
    python scripts/tls_scan.py --keep      # keep the temp prefix (conf, cert, logs)
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import apt_install, free_port, get, make_certificate, stop_group  # scripts/ is on sys.path

REPO = Path(__file__).resolve().parent.parent

CONF = """\
error_log logs/error.log info;
pid logs/forkgw.pid;
http {{
    access_log off;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate     {cert};
        ssl_certificate_key {key};
        location / {{ return 200 "ok"; }}
    }}
}}
"""

OLD_PROTOCOLS = ("SSLv2", "SSLv3", "TLSv1.0", "TLSv1.1")
# cipher name fragments that make a cipher weak, and why
WEAK = [
    (re.compile(r"NULL"), "NULL"),
    (re.compile(r"EXP"), "EXPORT"),
    (re.compile(r"RC4"), "RC4"),
    (re.compile(r"(^|[-_])(DES|3DES)([-_]|$)|DES-CBC|DES_CBC|DES-EDE|DES_EDE"), "DES/3DES"),
    (re.compile(r"MD5"), "MD5"),
    (re.compile(r"^(ADH|AECDH)-|_anon_|-anon-|aNULL"), "anonymous"),
]


def ensure_sslscan() -> str:
    """sslscan's path; installed with apt-get if missing (apt's chatter kept out of the summary)."""
    if not shutil.which("sslscan"):
        apt_install(["sslscan"], stdout=sys.stderr)
    found = shutil.which("sslscan")
    if not found:
        raise RuntimeError("sslscan is not on PATH after apt-get install")
    return found


class Gateway:
    """forkgw in its own session; stop() kills its whole process group."""

    def __init__(self, prefix: Path, port: int):
        self.prefix = prefix
        self.port = port
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        out = open(self.prefix / "logs" / "stdout.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "forkgw", "-p", str(self.prefix),
                                      "-c", "conf/gateway.conf"], cwd=self.prefix, env=env,
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        out.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"forkgw exited with {self.proc.returncode}: {self.tail()}")
            try:
                status, _, body = get(self.port, "/", token=False, tls=True)
                if status == 200 and body == b"ok":
                    return
                last = f"status {status}, body {body[:80]!r}"
            except (OSError, ValueError, IndexError) as err:
                last = repr(err)
            if time.monotonic() > deadline:
                raise RuntimeError(f"forkgw did not answer over TLS on port {self.port} within {timeout:g}s "
                                   f"({last}): {self.tail()}")
            time.sleep(0.1)

    def tail(self) -> str:
        text = "".join(p.read_text(errors="replace")[-800:] for p in sorted((self.prefix / "logs").glob("*.log")))
        return text.strip()[-1500:] or "(no output)"

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)

    def log_lines(self, levels: str) -> list[str]:
        path = self.prefix / "logs" / "error.log"
        if not path.exists():
            return []
        return [line for line in path.read_text(errors="replace").splitlines()
                if re.search(rf"\[({levels})\]", line)]


# -- sslscan's text output ---------------------------------------------------------


def sections(text: str) -> dict[str, list[str]]:
    """sslscan's output by section: a title is an indented line ending in ':' ("  SSL/TLS Protocols:")."""
    out: dict[str, list[str]] = {"": []}
    current = ""
    for line in text.splitlines():
        if re.match(r"^  \S.*:\s*$", line):
            current = line.strip().rstrip(":")
            out[current] = []
        elif line.strip():
            out[current].append(line.strip())
    return out


def parse(text: str) -> dict:
    sec = sections(text)
    protocols = {}
    for line in sec.get("SSL/TLS Protocols", []):
        if m := re.match(r"^(SSLv\d|TLSv1\.\d)\s+(enabled|disabled)", line):
            protocols[m.group(1)] = m.group(2) == "enabled"
    ciphers = []
    for line in sec.get("Supported Server Cipher(s)", []):
        m = re.match(r"^(Preferred|Accepted)\s+(\S+)\s+(\d+)\s+bits\s+(\S+)\s*(.*)$", line)
        if m:
            ciphers.append({"preferred": m.group(1) == "Preferred", "protocol": m.group(2), "bits": int(m.group(3)),
                            "name": m.group(4), "kex": re.sub(r"\s+", " ", m.group(5)).strip()})
    groups = []
    for line in sec.get("Server Key Exchange Group(s)", []):
        if m := re.match(r"^(\S+)\s+(\d+)\s+bits\s+(.+)$", line):
            groups.append({"protocol": m.group(1), "bits": int(m.group(2)), "name": m.group(3).strip()})
    certificate = {}
    for line in sec.get("SSL Certificate", []):
        key, sep, value = line.partition(":")
        if sep and value.strip():
            certificate[key.strip()] = value.strip()
    extras = {title: lines for title, lines in sec.items()
              if title in ("TLS Fallback SCSV", "TLS renegotiation", "TLS Compression", "Heartbleed")}
    return {"protocols": protocols, "ciphers": ciphers, "groups": groups, "certificate": certificate,
            "extras": extras}


def weaknesses(cipher: dict) -> list[str]:
    why = [label for pattern, label in WEAK if pattern.search(cipher["name"])]
    if cipher["bits"] < 128:
        why.append(f"{cipher['bits']} bits")
    return why


def verdict(scan: dict) -> list[str]:
    """Why the settings fail; empty when they pass."""
    problems = []
    if not scan["protocols"]:
        problems.append("no protocol lines in sslscan's output")
    if not scan["ciphers"]:
        problems.append("no accepted cipher in sslscan's output")
    for name in OLD_PROTOCOLS:
        if scan["protocols"].get(name):
            problems.append(f"{name} enabled")
    for c in scan["ciphers"]:
        if why := weaknesses(c):
            problems.append(f"weak cipher {c['protocol']} {c['name']} ({', '.join(why)})")
    return problems


def print_summary(scan: dict, problems: list[str]) -> None:
    p = scan["protocols"]
    print("protocols enabled:  " + (", ".join(n for n, on in p.items() if on) or "none"))
    print("protocols disabled: " + (", ".join(n for n, on in p.items() if not on) or "none"))
    print(f"accepted ciphers ({len(scan['ciphers'])}):")
    for c in scan["ciphers"]:
        mark = "  preferred" if c["preferred"] else ""
        print(f"  {c['protocol']:<8} {c['bits']:>3} bits  {c['name']:<32} {c['kex']}{mark}")
    print(f"key exchange groups ({len(scan['groups'])}):")
    by_protocol: dict[str, list[str]] = {}
    for g in scan["groups"]:
        by_protocol.setdefault(g["protocol"], []).append(f"{g['name']} ({g['bits']} bits)")
    for proto, names in by_protocol.items():
        print(f"  {proto:<8} " + ", ".join(names))
    if low := [f"{g['protocol']} {g['name']}" for g in scan["groups"] if g["bits"] < 128]:
        print(f"  note: groups under 128 bits of strength offered (not part of the verdict): {', '.join(low)}")
    cert = scan["certificate"]
    key = ", ".join(f"{k}: {cert[k]}" for k in cert if re.search(r"Key Strength|Curve Name|Signature Algorithm", k))
    print("certificate: " + (key or "not reported") + (f"; subject {cert['Subject']}" if "Subject" in cert else ""))
    for title, lines in scan["extras"].items():
        print(f"{title.lower()}: " + "; ".join(lines))
    print()
    if problems:
        print("VERDICT: FAIL - " + "; ".join(problems))
    else:
        print("VERDICT: PASS - nothing older than TLS 1.2 enabled, no weak cipher "
              "(NULL, EXPORT, RC4, DES/3DES, MD5, anonymous, under 128 bits)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--raw", action="store_true", help="print sslscan's own output before the summary")
    ap.add_argument("--keep", action="store_true", help="keep the temp prefix")
    ap.add_argument("--scan-timeout", type=float, default=600, help="seconds sslscan may take (default 600)")
    args = ap.parse_args()

    sslscan = ensure_sslscan()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below runs
    prefix = Path(tempfile.mkdtemp(prefix="forkgw-tls-scan-"))
    for sub in ("conf", "logs", "certs"):
        (prefix / sub).mkdir()
    port = free_port()
    gateway = Gateway(prefix, port)
    try:
        cert, key = make_certificate(prefix / "certs", "scan", "forkgw tls scan")
        key.chmod(0o600)
        (prefix / "conf" / "gateway.conf").write_text(CONF.format(port=port, cert=cert, key=key))
        gateway.start()
        gateway.wait_ready()
        version = re.sub(r"\x1b\[[0-9;]*m", "", subprocess.run([sslscan, "--version"], capture_output=True,
                                                                 text=True).stdout).split()
        cmd = [sslscan, "--no-colour", f"127.0.0.1:{port}"]
        print(f"$ {' '.join(cmd)}   (sslscan {' '.join(version[:3])}; forkgw defaults, "
              f"ECDSA P-256 certificate; forkgw's {ssl.OPENSSL_VERSION})")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.scan_timeout)
        output = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)
        if args.raw:
            print(output)
        if proc.returncode != 0:
            print(f"sslscan exited {proc.returncode}: {(proc.stderr or output).strip()[-500:]}", file=sys.stderr)
            return 2
        still_up = gateway.proc.poll() is None
        handshake_failures = len(gateway.log_lines("info"))
        problems_in_log = gateway.log_lines("error|alert|crit|emerg")
    finally:
        gateway.stop()
        if args.keep:
            print(f"kept {prefix}", file=sys.stderr)
        else:
            shutil.rmtree(prefix, ignore_errors=True)

    scan = parse(output)
    problems = verdict(scan)
    print_summary(scan, problems)
    print(f"forkgw's error log: {handshake_failures} [info] lines (the scanner's refused handshakes), "
          f"{len(problems_in_log)} at [error] or worse" + ("" if still_up else "; forkgw had EXITED by the end"))
    for line in problems_in_log[-10:]:
        print(f"  {line[:200]}")
    if not scan["protocols"] or not scan["ciphers"]:
        return 2
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
