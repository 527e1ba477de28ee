#!/usr/bin/env python3
"""`make verify HOST=…`: the testinfra checks in this folder against hosts of an Ansible inventory.

    tests/host/verify.py --inventory ansible/inventory/hosts.yml --hosts gpu01 [--json] [-m 'not gpu']

One line per check (PASS/FAIL/SKIP host check: reason). --json prints the same as JSON on stdout.
Exit codes: 0 every check passed (skips allowed), 1 a check failed, 2 usage or environment error
(no inventory, no such host, host unreachable)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent


class Collector:
    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed") or (
                report.when == "teardown" and report.outcome == "failed"):
            host, _, check = report.nodeid.partition("[")[2].rstrip("]").partition("://")[2], "", report.nodeid
            name = report.nodeid.split("::")[-1].split("[")[0].removeprefix("test_").replace("_", " ")
            if report.skipped:
                outcome = "skip"
                reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
                reason = reason.removeprefix("Skipped: ")
            else:
                outcome = "pass" if report.passed else ("error" if report.when != "call" else "fail")
                reason = "" if report.passed else short(report)
            del check
            self.results.append({"host": host, "check": name, "outcome": outcome, "detail": reason,
                                 "seconds": round(report.duration, 2)})


def short(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    return " ".join(text.split())[:400]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inventory", required=True, help="Ansible inventory file")
    parser.add_argument("--hosts", required=True, help="host, group or pattern of the inventory (or localhost)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    parser.add_argument("-m", dest="markers", default=None, help="pytest marker expression, e.g. 'not gpu' or gpu")
    args = parser.parse_args()

    # ansible and ansible-inventory (testinfra calls it) from the same environment as this Python.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if not Path(args.inventory).exists():
        print(f"verify: no inventory at {args.inventory}", file=sys.stderr)
        return 2
    listed = subprocess.run(["ansible", "-i", args.inventory, "--list-hosts", args.hosts],
                            capture_output=True, text=True)
    if listed.returncode != 0 or "hosts (0)" in listed.stdout:
        print(f"verify: {args.hosts!r} matches no host of {args.inventory}"
              f"{': ' + listed.stderr.strip() if listed.stderr.strip() else ''}", file=sys.stderr)
        return 2

    collector = Collector()
    pytest_args = [str(HERE), "-p", "no:cacheprovider", "-q", "--no-header", "-rN", "-o", "addopts=--strict-markers",
                   f"--hosts=ansible://{args.hosts}", f"--ansible-inventory={args.inventory}",
                   "--rootdir", str(HERE), "-c", os.devnull]
    if args.markers:
        pytest_args += ["-m", args.markers]
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        code = pytest.main(pytest_args, plugins=[collector])

    unreachable = [r for r in collector.results if r["outcome"] == "error"
                   and any(w in r["detail"].lower() for w in ("unreachable", "permission denied", "connection", "ssh"))]
    if args.json:
        print(json.dumps({"hosts": args.hosts, "results": collector.results}, indent=2))
    else:
        for r in collector.results:
            line = f"{r['outcome'].upper():5} {r['host']}: {r['check']}"
            print(line + (f" - {r['detail']}" if r["detail"] else ""), file=sys.stderr if args.json else sys.stdout)
    failed = [r for r in collector.results if r["outcome"] in ("fail", "error")]
    summary = (f"verify: {sum(r['outcome'] == 'pass' for r in collector.results)} passed, {len(failed)} failed, "
               f"{sum(r['outcome'] == 'skip' for r in collector.results)} skipped")
    print(summary, file=sys.stderr)
    if unreachable and len(unreachable) == len(failed):
        return 2
    if code in (0, 5) and not failed:
        return 0 if collector.results else 2
    return 1 if failed else 2

if __name__ == "__main__":
    sys.exit(main())
