"""The `modelfleet` subcommands around a cluster rather than in it: Grafana dashboards and API keys."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_dashboards_parser", "add_keys_parser"]


def _say(line: str) -> None:
    print(line, flush=True)


def _cmd_dashboards_export(args: argparse.Namespace) -> int:
    from cluster.k8s import DEFAULT_OUT, PROJECT_ROOT
    from cluster.k8s.tree import DASHBOARDS_DIR
    from cluster.observability import export

    for path in export(Path(args.out) if args.out else PROJECT_ROOT / DEFAULT_OUT / DASHBOARDS_DIR):
        _say(f"wrote {path}")
    return 0


def _cmd_dashboards_push(args: argparse.Namespace) -> int:
    from cluster.observability.grafana import FOLDER_UID, GrafanaError, push

    try:
        pushed = push(args.url, args.token, folder_uid=args.folder or FOLDER_UID)
    except GrafanaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for board in pushed:
        _say(f"{board.title}: {args.url.rstrip('/')}{board.url} (version {board.version})")
    return 0


def add_dashboards_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("dashboards", help="the Grafana dashboards: write their JSON, or upload them to a Grafana")
    boards = p.add_subparsers(dest="dashboards_command", required=True)
    p = boards.add_parser("export", help="write every dashboard as <uid>.json")
    p.add_argument("--out", help="folder to write into (default: the repository's k8s/dashboards/)")
    p.set_defaults(func=_cmd_dashboards_export)
    p = boards.add_parser("push", help="create or overwrite the dashboards in a Grafana, in one folder")
    p.add_argument("--url", required=True, help="Grafana's base URL, e.g. http://localhost:3000")
    p.add_argument("--token", help="a service-account token with the Editor role (or user:password in --url)")
    p.add_argument("--folder", help="uid of the folder, created when missing (default: modelfleet)")
    p.set_defaults(func=_cmd_dashboards_push)


def _cmd_keys_create(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from deployments.auth import generate_key, key_entry_yaml

    key = generate_key()
    try:
        entry = key_entry_yaml(args.name, key)
    except ValidationError as exc:
        print(f"error: {exc.errors()[0]['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    _say(f"API key '{args.name}' (shown only this once; the config keeps its SHA-256, not the key):\n\n  {key}\n")
    _say("Add this entry under `router.keys` (optionally with `models`, `rpm`, `tpm`, `tokens_per_day`):\n")
    _say(entry)
    return 0


def add_keys_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from deployments.auth import ApiKeyConfig

    p = sub.add_parser("keys", help="API keys for router.keys")
    keys = p.add_subparsers(dest="keys_command", required=True)
    p = keys.add_parser("create", help="print a new random API key once, and its router.keys entry (by SHA-256)")
    p.add_argument("name", help=ApiKeyConfig.model_fields["name"].description)
    p.set_defaults(func=_cmd_keys_create)
