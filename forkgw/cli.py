"""nginx's command line: -c -p -g -e -t -T -q -v -V -s, then the master runs in the foreground."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from forkgw import __version__
from forkgw.errors import ConfError
from forkgw.log import eprint

SIGNALS = {"stop": signal.SIGTERM, "quit": signal.SIGQUIT, "reopen": signal.SIGUSR1,
           "reload": signal.SIGHUP}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forkgw", add_help=False,
                                description="An nginx-shaped gateway that runs proxy-wasm filters.")
    p.add_argument("-?", "-h", action="help", help="this help")
    p.add_argument("-v", action="store_true", help="show version and exit")
    p.add_argument("-V", action="store_true", help="show version and the versions of its parts, then exit")
    p.add_argument("-t", action="store_true", help="test configuration and exit")
    p.add_argument("-T", action="store_true", help="test configuration, dump it and exit")
    p.add_argument("-q", action="store_true", help="suppress non-error messages during configuration testing")
    p.add_argument("-s", metavar="signal", choices=sorted(SIGNALS),
                   help="send signal to a master process: stop, quit, reopen, reload")
    p.add_argument("-p", metavar="prefix", help="set prefix path (default: the conf file's parent folder)")
    p.add_argument("-e", metavar="filename", help="set error log file (default: from the conf)")
    p.add_argument("-c", metavar="filename", default="conf/gateway.conf",
                   help="set configuration file (default: conf/gateway.conf)")
    p.add_argument("-g", metavar="directives", help="set global directives out of configuration file")
    return p


def versions() -> str:
    import h11
    import wasmtime

    try:
        from importlib.metadata import version

        wasmtime_version = version("wasmtime")
    except Exception:
        wasmtime_version = getattr(wasmtime, "__version__", "?")
    return (f"forkgw version: forkgw/{__version__}\n"
            f"python: {sys.version.split()[0]}, h11: {h11.__version__}, wasmtime: {wasmtime_version}")


def test_conf(args) -> int:
    from forkgw import conf as confmod
    from forkgw.master import load

    # The file the loader reads: a relative -c resolves against -p when one is given.
    path = os.path.abspath(os.path.join(args.p, args.c) if args.p else args.c)
    try:
        config, _ = load(args.c, args.p, args.g)
    except ConfError as err:
        eprint(f"[emerg] {err}")
        eprint(f"configuration file {path} test failed")
        return 1
    if not args.q:
        eprint(f"the configuration file {path} syntax is ok")
        eprint(f"configuration file {path} test is successful")
    if args.T:
        sys.stdout.write(confmod.dump(config))
    return 0


def send_signal(args) -> int:
    from forkgw import conf as confmod

    try:
        config = confmod.load(args.c, args.p, args.g)
    except ConfError as err:
        eprint(f"[emerg] {err}")
        return 1
    if args.s == "reload":
        outcome = reload_over_control(config)
        if outcome is not None:
            return outcome
    try:
        with open(config.pid) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError) as err:
        eprint(f'[error] invalid PID number in "{config.pid}" ({err})')
        return 1
    try:
        os.kill(pid, SIGNALS[args.s])
    except ProcessLookupError:
        eprint(f"[error] kill({pid}, {SIGNALS[args.s]}) failed (3: No such process)")
        return 1
    return 0


def reload_over_control(config) -> int | None:
    """Ask the master to reload and wait for its answer; None if it has no control socket."""
    import socket

    from forkgw.control import control_path

    path = control_path(config)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5.0)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None  # an older master, or none: fall back to the signal
    with sock:
        sock.sendall(b"reload\n")
        sock.settimeout(config.worker_shutdown_timeout + 60.0)
        reply = b""
        try:
            while not reply.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
        except OSError as err:
            eprint(f"[error] no answer from the master on {path} ({err})")
            return 1
    text = reply.decode("utf-8", "replace").strip()
    if text.startswith("ok"):
        return 0
    eprint(f"[emerg] {text[6:] if text.startswith('error ') else text or 'the master closed the control socket'}")
    return 1


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.v or args.V:
        print(versions() if args.V else f"forkgw version: forkgw/{__version__}", file=sys.stderr)
        return 0
    if args.t or args.T:
        return test_conf(args)
    if args.s:
        return send_signal(args)
    from forkgw.master import Master

    return Master(args.c, args.p, args.g, args.e).start()


if __name__ == "__main__":
    sys.exit(main())
