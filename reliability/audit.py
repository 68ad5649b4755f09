"""Known-vulnerability audit of the locked dependencies (requirements.lock) with pip-audit.

Fails (exit 1) when a dependency has a known vulnerability. Where the advisory service cannot be
reached, pip-audit audits nothing: that is reported plainly and does not fail the run (exit 0), since
an offline CI machine cannot tell a safe environment from an unchecked one.

    python -m reliability.audit [--lock requirements.lock | --installed] [--service pypi|osv] [--out F]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from reliability.report import print_table, write_json


def audit(service: str, timeout_s: float, lock: str | None = "requirements.lock") -> dict[str, Any]:
    """Audit the pins of `lock` as they are (every one pinned: no resolution), or with `lock` None the
    distributions installed in this environment."""
    command = [sys.executable, "-m", "pip_audit", "--vulnerability-service", service]
    command += ["--progress-spinner", "off", "--format", "json"]
    command += ["--requirement", lock, "--no-deps", "--disable-pip"] if lock else ["--skip-editable"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"reachable": False, "problem": f"pip-audit did not finish within {timeout_s:.0f} s"}
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"reachable": False, "problem": last[:300]}
    dependencies = report.get("dependencies", [])
    audited = [d for d in dependencies if "skip_reason" not in d]
    vulnerable = {d["name"]: [v["id"] for v in d.get("vulns", [])] for d in audited if d.get("vulns")}
    return {
        "reachable": bool(audited),
        "problem": "" if audited else "no dependency could be looked up in the advisory service",
        "dependencies": len(dependencies),
        "audited": len(audited),
        "vulnerable": vulnerable,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--service", choices=["pypi", "osv"], default="pypi")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--lock", default="requirements.lock", help="the pinned dependencies to audit")
    parser.add_argument("--installed", action="store_true", help="audit this environment instead")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = audit(args.service, args.timeout, None if args.installed else args.lock)
    rows = [("audited", "this environment" if args.installed else args.lock)]
    rows += [("advisory service", args.service), ("reachable", "yes" if result["reachable"] else "NO")]
    if "dependencies" in result:
        rows += [("dependencies", result["dependencies"]), ("looked up", result["audited"])]
        rows += [("with known vulnerabilities", len(result["vulnerable"]))]
    print_table("Dependency audit (pip-audit)", rows)
    for name, ids in result.get("vulnerable", {}).items():
        print(f"VULNERABLE {name}: {', '.join(ids)}")
    if not result["reachable"]:
        print(f"warning: nothing was audited: {result['problem']}", file=sys.stderr)
    write_json(args.out, result)
    return 1 if result.get("vulnerable") else 0


if __name__ == "__main__":
    sys.exit(main())
