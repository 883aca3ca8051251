"""`fedgen jobs`, `fedgen job show | create | pause | resume | cancel`: the operator's view of a running server
over its REST API (stdlib HTTP only, so it works wherever `fedgen` is installed).

The server's address comes from ``--api`` or ``FEDGEN_API_URL`` (default http://127.0.0.1:8000); the admin
token for the commands that change a job from ``--token`` or ``FEDGEN_ADMIN_TOKEN``. Every failure is one
line on stderr and exit status 2: the server cannot be reached, or the API's own error message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_API = "http://127.0.0.1:8000"
TIMEOUT_S = 15.0
MAX_JOB_FILE_BYTES = 1 << 20


class ApiCallError(ValueError):
    """A request the server refused or could not be sent; its message is the line the user sees."""


def _base_url(args: argparse.Namespace) -> str:
    return (args.api or os.environ.get("FEDGEN_API_URL") or DEFAULT_API).rstrip("/")


def _token(args: argparse.Namespace) -> str | None:
    return getattr(args, "token", None) or os.environ.get("FEDGEN_ADMIN_TOKEN") or None


def _api_message(body: bytes) -> str | None:
    """The ``error.message`` of an API error body, if it is one."""
    try:
        err = json.loads(body)["error"]
        return f"{err['message']} ({err['code']})"
    except (ValueError, KeyError, TypeError):
        return None


def call(args: argparse.Namespace, method: str, path: str, body: bytes | None = None) -> Any:
    """One request to the server's API; the decoded JSON answer."""
    base = _base_url(args)
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    token = _token(args)
    if token and method != "GET":
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(base + path, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = _api_message(exc.read()) or exc.reason
        hint = " (set FEDGEN_ADMIN_TOKEN or --token)" if exc.code == 401 and not token else ""
        raise ApiCallError(f"{method} {path}: HTTP {exc.code}: {detail}{hint}") from None
    except urllib.error.URLError as exc:
        raise ApiCallError(f"cannot reach the server at {base}: {exc.reason} (is `fedgen server` running? "
                           "--api / FEDGEN_API_URL say where it is)") from None
    except (TimeoutError, ConnectionError) as exc:
        raise ApiCallError(f"cannot reach the server at {base}: {exc}") from None
    except ValueError:
        raise ApiCallError(f"{method} {path}: the answer is not JSON (is {base} a fedgen server?)") from None


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header, *[["-" if v is None else str(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _pct(value: float | None) -> str | None:
    return None if value is None else f"{100 * value:.2f}%"


def cmd_jobs(args: argparse.Namespace) -> int:
    page = call(args, "GET", f"/jobs?limit={args.limit}")
    rows = []
    for job in page["items"]:
        cfg = job.get("config") or {}
        algo = (cfg.get("algorithm") or {}).get("algorithm")
        rows.append([job["id"], job["status"], f"{job['current_round']}/{cfg.get('rounds', '?')}", algo,
                     cfg.get("dataset"), job.get("waiting_for_devices")])
    print(_table(rows, ["JOB", "STATUS", "ROUND", "ALGORITHM", "DATASET", "WAITING FOR DEVICES"]))
    if page["total"] > len(page["items"]):
        print(f"({len(page['items'])} of {page['total']} jobs; --limit shows more)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    job = call(args, "GET", f"/jobs/{args.job_id}")
    rounds = call(args, "GET", f"/jobs/{args.job_id}/rounds?limit={args.limit}&offset=0")
    cfg = job.get("config") or {}
    print(f"job {job['id']}: {job['status']}, round {job['current_round']} of {cfg.get('rounds', '?')}, "
          f"model version {job.get('latest_model_version')}")
    if job.get("waiting_for_devices"):
        print(f"waiting for devices: {job['waiting_for_devices']} online")
    if job.get("error"):
        print(f"error: {job['error']}")
    if args.config:
        print(json.dumps(cfg, indent=2, sort_keys=True))
    rows = [[r["index"], r["attempt"], r["status"], f"{r['num_updates']}/{len(r['selected'])}",
             _pct(r["accuracy"]), r["bytes_up"], r["bytes_down"], r.get("failure_reason")]
            for r in rounds["items"]]
    if rows:
        print(_table(rows, ["ROUND", "ATTEMPT", "STATUS", "UPDATES", "ACCURACY", "BYTES UP", "BYTES DOWN",
                            "REASON"]))
    if rounds["total"] > len(rounds["items"]):
        print(f"({len(rounds['items'])} of {rounds['total']} round attempts; --limit shows more)")
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    name = "stdin" if args.file == "-" else args.file
    try:
        if args.file == "-":
            text = sys.stdin.read(MAX_JOB_FILE_BYTES + 1)
        else:
            with Path(args.file).open(encoding="utf-8") as fh:
                text = fh.read(MAX_JOB_FILE_BYTES + 1)
        if len(text) > MAX_JOB_FILE_BYTES:
            raise ApiCallError(f"{name}: larger than {MAX_JOB_FILE_BYTES} bytes; a job file is a small JSON object")
        json.loads(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise ApiCallError(f"cannot read the job file: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ApiCallError(f"{name}: not JSON ({exc})") from None
    job = call(args, "POST", "/jobs", text.encode())
    print(f"job {job['id']} created ({job['status']})")
    return 0


def cmd_control(args: argparse.Namespace) -> int:
    job = call(args, "POST", f"/jobs/{args.job_id}/{args.action}", b"{}")
    print(f"job {job['id']}: {job['status']}")
    return 0


def _connection(p: argparse.ArgumentParser, admin: bool = False) -> None:
    p.add_argument("--api", help=f"the server's base URL (default $FEDGEN_API_URL or {DEFAULT_API})")
    if admin:
        p.add_argument("--token", help="the server's admin token (default $FEDGEN_ADMIN_TOKEN)")


def add_job_commands(sub: argparse._SubParsersAction) -> None:
    """`fedgen jobs` and `fedgen job ...` on the `fedgen` parser's sub-commands."""
    jobs = sub.add_parser("jobs", help="list the server's jobs (status, round, devices it waits for)")
    jobs.add_argument("--limit", type=int, default=100, choices=range(1, 1001), metavar="N",
                      help="at most N jobs, newest first (1-1000, default 100)")
    _connection(jobs)
    jobs.set_defaults(func=cmd_jobs)

    job = sub.add_parser("job", help="show, create, pause, resume or cancel one job")
    cmds = job.add_subparsers(dest="job_command", required=True)
    show = cmds.add_parser("show", help="a job and its round attempts")
    show.add_argument("job_id")
    show.add_argument("--limit", type=int, default=1000, choices=range(1, 1001), metavar="N",
                      help="at most N round attempts (1-1000, default 1000)")
    show.add_argument("--config", action="store_true", help="also print the job's configuration")
    _connection(show)
    show.set_defaults(func=cmd_show)
    create = cmds.add_parser("create", help="create a job from a JSON file (the body of POST /jobs; - for stdin)")
    create.add_argument("file")
    _connection(create, admin=True)
    create.set_defaults(func=cmd_create)
    for action, text in (("pause", "open no new round until resumed (the open round finishes as usual)"),
                         ("resume", "go on with a paused job"),
                         ("cancel", "end the job for good: its open round fails, its devices are told to stop")):
        p = cmds.add_parser(action, help=text)
        p.add_argument("job_id")
        _connection(p, admin=True)
        p.set_defaults(func=cmd_control, action=action)
