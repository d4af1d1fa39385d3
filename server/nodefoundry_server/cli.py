"""Command line: ``nodefoundry-server run | token ... | assets import | db check | config check | version``."""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections.abc import Sequence

from . import __version__, auth
from . import config as config_module
from .assets import AssetError, import_assets
from .boot import DEBIAN_ARCHES
from .config import Config, ConfigError
from .mqtt.credentials import external_auth_files
from .store import Store


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nodefoundry-server", description="NodeFoundry provisioning server")
    parser.add_argument("--config", help="YAML configuration file (NF_* environment variables override it)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="start the server")
    commands.add_parser("version", help="print the version")

    token = commands.add_parser("token", help="manage API tokens").add_subparsers(dest="token_command", required=True)
    create = token.add_parser("create", help="create a token and print it (shown only once)")
    create.add_argument("--name", required=True)
    create.add_argument("--role", choices=auth.ROLES, default="admin")
    token.add_parser("list", help="list token names and roles")
    revoke = token.add_parser("revoke", help="delete a token")
    revoke.add_argument("--name", required=True)

    assets = commands.add_parser("assets", help="installer assets").add_subparsers(dest="assets_command", required=True)
    imp = assets.add_parser("import", help="import the Debian 12 netboot installer")
    imp.add_argument("--arch", default=",".join(DEBIAN_ARCHES), help="comma-separated: amd64,arm64")
    imp.add_argument("--mirror", help="Debian mirror URL (default: Debian's netboot packages via apt)")

    db = commands.add_parser("db", help="database").add_subparsers(dest="db_command", required=True)
    db.add_parser("check", help="migrate if needed and run SQLite's integrity check")

    cfg = commands.add_parser("config", help="configuration").add_subparsers(dest="config_command", required=True)
    cfg.add_parser("check", help="validate the configuration without touching the database or the network")
    return parser


def _store(config: Config) -> Store:
    store = Store(config.db_path, config.db_synchronous)
    store.open()
    return store


def _token(args: argparse.Namespace, config: Config) -> int:
    store = _store(config)
    if args.token_command == "create":
        try:
            print(auth.create_token(store, args.name, args.role))
        except (auth.TokenNameTaken, ValueError) as exc:
            return _fail(str(exc))
    elif args.token_command == "list":
        for row in auth.list_tokens(store):
            print(f"{row['name']}\t{row['role']}\t{row['created_at']}")
    elif not auth.revoke_token(store, args.name):
        return _fail(f"no token named {args.name!r}")
    return 0


def _assets(args: argparse.Namespace, config: Config) -> int:
    try:
        done = import_assets(config.assets_dir, [a for a in args.arch.split(",") if a], args.mirror)
    except AssetError as exc:
        return _fail(str(exc))
    for arch, files in done.items():
        print(f"{arch}: {', '.join(files.values())}")
    return 0


def _db_check(config: Config) -> int:
    result = _store(config).integrity_check()
    print(result)
    return 0 if result == "ok" else 1


def _config_check(config: Config) -> int:
    """What ``run`` checks in the settings alone, so a deployment tool can refuse a file before it lands."""
    external_auth_files(config, Store(config.db_path))  # half-set broker files, missing username; opens nothing
    print(f"{config.source}: ok")
    return 0


def _fail(message: str) -> int:
    print(f"nodefoundry-server: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(__version__)
        return 0
    try:
        config = config_module.load(args.config)
        if args.command == "run":
            from .runtime import run

            return run(config)
        if args.command == "token":
            return _token(args, config)
        if args.command == "assets":
            return _assets(args, config)
        if args.command == "config":
            return _config_check(config)
        return _db_check(config)
    except ConfigError as exc:
        return _fail(str(exc))
    except (sqlite3.Error, OSError, RuntimeError) as exc:  # unusable database or data directory
        return _fail(f"NF_DB_PATH {config.db_path}: {exc}")


if __name__ == "__main__":
    sys.exit(main())
