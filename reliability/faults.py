"""Fault injection against the real service and the real indexer; each fault is injected, then survived
or not, and counted.

- start-up on a missing, truncated, tampered, unpublished or other-model bundle: a clear log line, /readyz
  503 and searches refused (default), or a non-zero exit (`exit_on_startup_error`); never wrong results;
- reload under load: bundles swapped back and forth while searches run; no request fails and no response
  mixes items of two bundles;
- SIGTERM under load: in-flight requests finish, new connections are refused, the process exits in time;
- the indexer SIGKILLed at several points of a build: no partial bundle is left; the next build succeeds;
- a slow or failing image decode or model call in one request: that request gets 503/504 with a JSON
  error, the requests around it are served.

    python -m reliability.faults --model RUN/best --bundle-a A --bundle-b B --data hm:../shared/data/hm \
        --limit 32 --cache cache [--out faults.json]

B must hold items A lacks (e.g. `--limit 32` and `--limit 64` of one catalogue); the data, limit and
cache are what the indexer-kill suite builds from.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from reliability.load import Query, bundle_queries, drive, send_search
from reliability.report import print_table, write_json
from reliability.serve import FAIL_DECODE, FAIL_ENCODE, FAIL_RERANK, SLOW_DECODE, SLOW_ENCODE
from reliability.service import REPO, running_service, start_service

ADMIN_KEY = "faults-admin-key"


@dataclass
class Fault:
    """One injected fault and whether the service (or indexer) came through it as it should."""

    suite: str
    name: str
    survived: bool
    detail: str = ""
    figures: dict[str, Any] = field(default_factory=dict)


# -- start-up on bad bundles ----------------------------------------------------------------------------


def bad_bundles(good: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (bundle folder, words the log must contain)."""
    root.mkdir(parents=True, exist_ok=True)

    def copy(name: str) -> Path:
        target = root / name
        shutil.copytree(good, target)
        return target

    truncated = copy("truncated")
    with open(truncated / "image.faiss", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    tampered = copy("tampered")
    with open(tampered / "patch_codes.npy", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 0xFF]))
    unpublished = copy("unpublished")
    (unpublished / "manifest.json").unlink()  # what a killed build would leave, had it used this name
    other_model = copy("other-model")
    manifest = json.loads((other_model / "manifest.json").read_text())
    manifest["model"]["fingerprint"] = "0" * 64
    (other_model / "manifest.json").write_text(json.dumps(manifest))
    return {
        "missing": (root / "does-not-exist", "not a folder"),
        "truncated": (truncated, "image.faiss"),
        "tampered": (tampered, "patch_codes.npy"),
        "unpublished (no manifest)": (unpublished, "manifest"),
        "built for another model": (other_model, "model"),
    }


def startup_faults(model: Path, good: Path, workdir: Path) -> list[Fault]:
    faults = []
    for name, (bundle, words) in bad_bundles(good, workdir / "bad").items():
        for exit_on_error in (False, True):
            mode = "exit" if exit_on_error else "stay up"
            log = workdir / f"startup-{name.split()[0]}-{mode.replace(' ', '-')}.log"
            service = start_service(model, bundle, log, {"exit_on_startup_error": exit_on_error})
            try:
                faults.append(_judge_startup(service, name, mode, words, exit_on_error or name == "missing"))
            finally:
                service.stop()
    return faults


def _judge_startup(service: Any, name: str, mode: str, words: str, must_exit: bool) -> Fault:
    """Poll until the service answers /readyz 200 or with its start-up error, or exits; then judge."""
    deadline = time.monotonic() + 300  # generous: loading competes for the cores with whatever else runs
    readyz = search = None
    while time.monotonic() < deadline and service.process.poll() is None:
        try:
            response = httpx.get(f"{service.base_url}/readyz", timeout=5)
        except httpx.TransportError:
            time.sleep(0.2)
            continue
        if response.status_code == 200 or "startup failed" in response.text:
            readyz = response
            search = httpx.post(f"{service.base_url}/search/text", json={"query": "dress"}, timeout=30)
            break
        time.sleep(0.2)
    if must_exit:
        try:
            code = service.process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            code = None
    log = service.log().lower()  # read after the exit, so the log is whole
    clear = words.lower() in log and ("error" in log or "failed" in log)
    if must_exit:
        survived = code not in (0, None) and clear and readyz is None
        detail = f"exit code {code}"
    else:
        survived = (
            readyz is not None
            and readyz.status_code == 503
            and search is not None
            and search.status_code == 503
            and clear
        )
        reason = readyz.json()["error"]["message"] if readyz is not None and readyz.status_code == 503 else ""
        detail = f"/readyz {readyz.status_code if readyz else None}: {reason}"
        detail += f"; search {search.status_code if search else None}"
    return Fault("start-up", f"{name}, {mode}", survived, detail + ("" if clear else "; log unclear"))


# -- reload under load -----------------------------------------------------------------------------------


async def _reload_under_load(
    base_url: str, queries: Sequence[Query], bundles: dict[str, Path], duration_s: float
) -> tuple[dict[str, Any], list[str]]:
    ids_of: dict[str, set[str]] = {}
    versions: dict[str, str] = {}
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as admin:
        for name, path in bundles.items():
            response = await admin.post(
                "/admin/reload", json={"index": str(path)}, headers={"X-API-Key": ADMIN_KEY}
            )
            assert response.status_code == 200, response.text
            versions[response.json()["index"]["version"]] = name
    ids_of = {name: _bundle_ids(path) for name, path in bundles.items()}
    problems: list[str] = []
    served_by: dict[str, int] = {name: 0 for name in bundles}

    def check(kind: str, response: httpx.Response, sent_at: float) -> None:
        if response.status_code != 200:
            problems.append(f"{kind} search answered {response.status_code}")
            return
        body = response.json()
        name = versions.get(body["index"]["version"])
        if name is None:
            problems.append(f"unknown bundle version {body['index']['version']}")
            return
        served_by[name] += 1
        strays = {r["id"] for r in body["results"]} - ids_of[name]
        if strays:
            problems.append(f"response of bundle {name} holds items of another: {sorted(strays)[:3]}")

    reloads = {"ok": 0, "failed": 0}

    async def reloader() -> None:
        names = list(bundles)
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as admin:
            turn = 0
            while True:
                path = bundles[names[turn % len(names)]]
                turn += 1
                response = await admin.post(
                    "/admin/reload", json={"index": str(path)}, headers={"X-API-Key": ADMIN_KEY}
                )
                reloads["ok" if response.status_code == 200 else "failed"] += 1
                await asyncio.sleep(0.5)

    task = asyncio.create_task(reloader())
    try:
        stats = await drive(base_url, queries, 8, duration_s, 10**9, check)
    finally:
        task.cancel()
    figures = {
        "requests": stats.sent,
        "ok": stats.statuses[200],
        "dropped": stats.dropped,
        "reloads": reloads["ok"],
        "failed_reloads": reloads["failed"],
        "served_by": served_by,
    }
    return figures, problems


def _bundle_ids(path: Path) -> set[str]:
    from index.bundle import Bundle

    with Bundle.open(path, verify_checksums=False) as bundle:
        return {item["id"] for item in bundle.items(list(range(bundle.rows)))}


def reload_fault(model: Path, bundles: dict[str, Path], workdir: Path, duration_s: float) -> Fault:
    queries = bundle_queries(bundles["a"], 8) + bundle_queries(bundles["b"], 8)
    settings = {"admin_api_key": ADMIN_KEY}
    with running_service(model, bundles["a"], workdir / "reload.server.log", settings) as service:
        figures, problems = asyncio.run(_reload_under_load(service.base_url, queries, bundles, duration_s))
    survived = (
        not problems
        and figures["dropped"] == 0
        and figures["reloads"] >= 2
        and figures["failed_reloads"] == 0
        and all(count > 0 for count in figures["served_by"].values())
    )
    detail = f"{figures['reloads']} swaps, {figures['ok']}/{figures['requests']} served " + "; ".join(
        problems[:3]
    )
    return Fault("reload", "bundles swapped under load", survived, detail, figures)


# -- SIGTERM under load ----------------------------------------------------------------------------------


async def _terminate_under_load(service: Any, queries: Sequence[Query], after_s: float) -> dict[str, Any]:
    """Load on fresh connections; SIGTERM after `after_s`; classify each request by when it was sent."""
    outcomes: list[tuple[float, float, str]] = []  # (sent at, answered at, outcome)
    terminated_at: float | None = None

    async def client_loop(worker: int) -> None:
        number = worker
        async with httpx.AsyncClient(
            base_url=service.base_url, timeout=60, limits=httpx.Limits(max_keepalive_connections=0)
        ) as client:
            while terminated_at is None or time.perf_counter() < terminated_at + 2.0:
                sent_at = time.perf_counter()
                kind = "image" if number % 2 else "text"
                try:
                    response = await send_search(client, kind, queries[number % len(queries)])
                    outcome = str(response.status_code)
                except httpx.ConnectError:
                    outcome = "refused"
                except httpx.RemoteProtocolError as error:
                    # Accepted by the kernel as the listener closed, closed before a byte of the request was
                    # handled: not processed, safe to retry; a refusal, not a lost request.
                    unanswered = "without sending a response" in str(error)
                    outcome = "refused" if unanswered else f"dropped:{type(error).__name__}"
                except httpx.TransportError as error:
                    # The same race can reset the connection instead (ReadError). A fresh connection opened
                    # after SIGTERM was never handed a request to finish: uvicorn drains only requests it
                    # had begun, so it is refused too; before SIGTERM, any such error is a lost request.
                    reset = isinstance(error, httpx.ReadError | httpx.WriteError)  # not a timeout
                    after_sigterm = terminated_at is not None and sent_at > terminated_at
                    outcome = "refused" if reset and after_sigterm else f"dropped:{type(error).__name__}"
                outcomes.append((sent_at, time.perf_counter(), outcome))
                number += 8
                if outcome == "refused":
                    await asyncio.sleep(0.05)

    workers = [asyncio.create_task(client_loop(w)) for w in range(8)]
    await asyncio.sleep(after_s)
    terminated_at = time.perf_counter()
    service.process.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(service.process.wait, 120)
    exit_s = time.perf_counter() - terminated_at
    await asyncio.gather(*workers)
    before = [o for sent, _, o in outcomes if sent < terminated_at - 0.2]
    after = [o for sent, _, o in outcomes if sent > terminated_at + 0.2]
    in_flight = [o for sent, done, o in outcomes if sent < terminated_at < done]
    return {
        "exit_code": code,
        "exit_s": exit_s,
        "in_flight_at_sigterm": len(in_flight),
        "in_flight_served": in_flight.count("200"),
        "sent_before": len(before),
        "served_before": before.count("200"),
        "sent_after": len(after),
        "refused_after": after.count("refused"),
        "dropped": sum(o.startswith("dropped") for _, _, o in outcomes),
        "dropped_at_s": [  # when each dropped request was sent and answered, relative to SIGTERM
            (round(sent - terminated_at, 3), round(done - terminated_at, 3), o)
            for sent, done, o in outcomes
            if o.startswith("dropped")
        ],
        "server_errors": sum(o[0] == "5" for _, _, o in outcomes),
    }


def sigterm_fault(model: Path, index: Path, workdir: Path, shutdown_timeout_s: float) -> Fault:
    queries = bundle_queries(index, 8)
    settings = {"shutdown_timeout_s": shutdown_timeout_s}
    service = start_service(model, index, workdir / "sigterm.server.log", settings)
    try:
        service.wait_ready()
        figures = asyncio.run(_terminate_under_load(service, queries, after_s=3.0))
    finally:
        service.stop()
    # uvicorn drains, runs the lifespan shutdown, then re-raises SIGTERM: -15 is its clean exit.
    clean = "Application shutdown complete" in service.log()
    survived = (
        clean
        and figures["exit_code"] in (0, -signal.SIGTERM)
        and figures["exit_s"] <= shutdown_timeout_s + 5
        and figures["served_before"] == figures["sent_before"] > 0
        and figures["in_flight_served"] == figures["in_flight_at_sigterm"] > 0
        and figures["refused_after"] == figures["sent_after"] > 0
        and figures["dropped"] == 0
        and figures["server_errors"] == 0
    )
    detail = (
        f"exit {figures['exit_code']} after {figures['exit_s']:.1f} s{', clean shutdown' if clean else ''}; "
        f"in flight at SIGTERM: {figures['in_flight_served']}/{figures['in_flight_at_sigterm']} served; "
        f"before: {figures['served_before']}/"
        f"{figures['sent_before']} served; after: {figures['refused_after']}/{figures['sent_after']} refused"
        + (f"; dropped (sent s, ended s, error): {figures['dropped_at_s']}" if figures["dropped"] else "")
    )
    return Fault("SIGTERM", "terminated under load", survived, detail, figures)


# -- indexer killed mid-build ----------------------------------------------------------------------------


def _build_command(model: Path, data: str, limit: int, cache: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "app.cli", "index", "build", "--model", str(model), "--data", data,
        "--limit", str(limit), "--cache", str(cache), "--out", str(out), "--patch-codec", "SQ8", "--device", "cpu",
    ]  # fmt: skip


def _bundle_state(out: Path) -> str:
    """'absent', 'valid' (opens with checksums) or 'INVALID' (a folder at the path that does not open)."""
    from index.bundle import Bundle, BundleError

    if not out.exists():
        return "absent"
    try:
        Bundle.open(out).close()  # checks every file's size and sha256
    except BundleError:
        return "INVALID"
    return "valid"


# Points of a build to kill it at: (what the staging folder holds by then, a file whose appearance marks it).
KILL_POINTS = {
    "staging folder made": None,
    "encoding (patch codes streaming)": "patch_codes.npy.part",
    "recall indexes written": "image.faiss",
    "arrays written": "token_lengths.npy",
    "manifest written, not yet published": "manifest.json",
}


def _kill_when(process: subprocess.Popen[bytes], root: Path, name: str, marker: str | None) -> bool:
    """SIGKILL the build as soon as its staging folder for `name` holds `marker` (or exists, for None);
    False when the build finished first."""
    while process.poll() is None:
        for staging in root.glob(f".{name}.staging-*"):
            if marker is None or (staging / marker).exists():
                process.send_signal(signal.SIGKILL)
                process.wait()
                return True
        time.sleep(0.001)
    return False


def indexer_kill_faults(
    model: Path, data: str, limit: int, cache: Path, workdir: Path, points: Sequence[str] = tuple(KILL_POINTS)
) -> list[Fault]:
    """SIGKILL builds at several points, into an empty path and over a previous bundle: what is left at
    the path must be nothing or a whole bundle (the old one, or the new one if the kill came after the
    swap), never a partial one; the next build on the path must succeed and clear the leftovers."""
    from index.bundle import read_manifest

    root = workdir / "indexer"
    root.mkdir(parents=True, exist_ok=True)
    reference = root / "reference"
    subprocess.run(
        _build_command(model, data, limit, cache, reference), cwd=REPO, check=True, capture_output=True
    )
    faults = []
    for previous in (False, True):
        for number, point in enumerate(points):
            out = root / f"kill-{number}-{'over-old' if previous else 'fresh'}"
            if previous:
                shutil.copytree(reference, out)
            before = read_manifest(out) if previous else None
            process = subprocess.Popen(
                _build_command(model, data, limit, cache, out),
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            killed = _kill_when(process, root, out.name, KILL_POINTS[point])
            state = _bundle_state(out)
            leftovers = list(root.glob(f".{out.name}.staging-*"))
            if previous:
                survived = state == "valid"
                state += ", the old one" if read_manifest(out) == before else ", the new one"
            else:
                survived = state in ("absent", "valid")
            detail = f"path {state}" if killed else f"NOT KILLED (the build finished first): path {state}"
            detail += f", {len(leftovers)} staging folder(s) left" if leftovers else ""
            rebuilt = subprocess.run(
                _build_command(model, data, limit, cache, out), cwd=REPO, capture_output=True
            )
            next_ok = rebuilt.returncode == 0 and _bundle_state(out) == "valid"
            next_ok = next_ok and not list(root.glob(f".{out.name}.staging-*"))
            detail += "; next build ok" if next_ok else "; NEXT BUILD FAILED"
            where = "over a previous bundle" if previous else "fresh path"
            name = f"SIGKILL when {point} ({where})"
            faults.append(Fault("indexer", name, killed and survived and next_ok, detail))
            shutil.rmtree(out, ignore_errors=True)
    return faults


# -- one bad request among good ones ----------------------------------------------------------------------


async def _stage_faults(base_url: str, queries: Sequence[Query]) -> list[Fault]:
    photo = queries[0].image
    cases = [
        ("slow image decode", "image", photo + SLOW_DECODE, 504, "stage_timeout"),
        ("failing image decode", "image", photo + FAIL_DECODE, 503, "stage_failed"),
        ("failing model call (encode)", "text", f"red dress {FAIL_ENCODE}", 503, "stage_failed"),
        ("failing model call (re-rank batch)", "text", f"blue jeans {FAIL_RERANK}", 503, "stage_failed"),
        ("slow model call (encode)", "text", f"black coat {SLOW_ENCODE}", 504, "stage_timeout"),
    ]
    faults = []
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        for name, kind, payload, status, code in cases:
            query = Query(payload, photo) if kind == "text" else Query(queries[0].text, payload)
            # Neighbours: load running while the bad request is in flight, started just after it.
            bad = asyncio.create_task(send_search(client, kind, query))
            await asyncio.sleep(0.05)
            neighbours = await drive(base_url, queries, 4, 1.5, 10**9)
            response = await bad
            good_after = await drive(base_url, queries, 2, 1.0, 10**9)
            body = response.json()
            answered = response.status_code == status and body.get("error", {}).get("code") == code
            neighbours_ok = neighbours.statuses[200] == neighbours.sent > 0
            survived = answered and neighbours_ok and good_after.statuses[200] == good_after.sent
            detail = (
                f"answered {response.status_code} {body.get('error', {}).get('code')}; neighbours "
                f"{neighbours.statuses[200]}/{neighbours.sent} served"
                + (f" ({dict(neighbours.statuses)})" if not neighbours_ok else "")
                + f"; after: {good_after.statuses[200]}/{good_after.sent}"
            )
            figures = {
                "status": response.status_code,
                "neighbours_sent": neighbours.sent,
                "neighbours_served": neighbours.statuses[200],
                "after_sent": good_after.sent,
                "after_served": good_after.statuses[200],
            }
            faults.append(Fault("one bad request", name, survived, detail, figures))
    return faults


def stage_faults(model: Path, index: Path, workdir: Path) -> list[Fault]:
    # The slow model call (2.5 s) passes its 1 s call limit: abandoned, the requests behind it go on.
    settings = {"decode_timeout_s": 1.0, "stage_timeout_s": 2.0, "model_call_timeout_s": 1.0}
    queries = bundle_queries(index, 8)
    with running_service(
        model, index, workdir / "stages.server.log", settings, faults=True, slow_s=2.5
    ) as service:
        return asyncio.run(_stage_faults(service.base_url, queries))


# -- the run ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, workdir: Path) -> list[Fault]:
    faults = stage_faults(args.model, args.bundle_a, workdir)
    faults += startup_faults(args.model, args.bundle_a, workdir)
    faults.append(
        reload_fault(args.model, {"a": args.bundle_a, "b": args.bundle_b}, workdir, args.reload_seconds)
    )
    faults.append(sigterm_fault(args.model, args.bundle_a, workdir, args.shutdown_timeout))
    if args.data:
        faults += indexer_kill_faults(args.model, args.data, args.limit, args.cache, workdir)
    return faults


def print_result(faults: Sequence[Fault]) -> None:
    for fault in faults:
        print(f"{'ok ' if fault.survived else 'BAD'} [{fault.suite}] {fault.name}: {fault.detail}")
    rows: list[tuple[str, Any]] = []
    for suite in dict.fromkeys(f.suite for f in faults):
        mine = [f for f in faults if f.suite == suite]
        rows.append(
            (f"{suite}: faults injected / survived", f"{len(mine)} / {sum(f.survived for f in mine)}")
        )
    rows.append(("all faults injected / survived", f"{len(faults)} / {sum(f.survived for f in faults)}"))
    print_table("Faults", rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="checkpoint folder")
    parser.add_argument("--bundle-a", type=Path, required=True, help="a bundle built for that checkpoint")
    parser.add_argument("--bundle-b", type=Path, required=True, help="another, with other items")
    parser.add_argument(
        "--data", default=None, help="catalogue the indexer-kill suite builds (skipped without)"
    )
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--cache", type=Path, default=Path("cache"), help="patch-feature cache folder")
    parser.add_argument("--reload-seconds", type=float, default=10.0)
    parser.add_argument("--shutdown-timeout", type=float, default=10.0)
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="faults-") as workdir:
        faults = run(args, Path(workdir))
    print_result(faults)
    write_json(args.out, {"faults": [fault.__dict__ for fault in faults]})
    return 0 if all(fault.survived for fault in faults) else 1


if __name__ == "__main__":
    sys.exit(main())
