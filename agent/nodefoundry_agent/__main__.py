"""``nodefoundry-agent [--env-file PATH] [--version]``: the command line and the process around the agent.

Under systemd the settings come from the environment (``EnvironmentFile=``); ``--env-file`` reads the same
file when the agent is started by hand, and variables already set in the environment win over it, so one
value can be overridden for a test run (``NF_LOG_LEVEL=debug nodefoundry-agent --env-file ...``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from nodefoundry_agent import __version__, config, netinfo, sdnotify

log = logging.getLogger("nodefoundry_agent")

MAC_RETRY_SECONDS = 10.0


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    env, env_problem = _environment(args.env_file)
    settings, warnings = config.load(env)
    _setup_logging(settings.log_level)
    for warning in ([env_problem] if env_problem else []) + warnings:
        log.warning("%s", warning)
    try:
        from nodefoundry_agent.agent import Agent  # needs paho-mqtt
    except ImportError as err:
        log.error("cannot load paho-mqtt (%s): install the Debian package python3-paho-mqtt", err)
        return 1
    sdnotify.notify("READY=1")  # configured and running; the broker may come later, and so may the NIC
    stopped = threading.Event()
    _on_termination(stopped.set)
    mac = settings.mac or _wait_for_mac(stopped)
    if mac is None:
        return 0
    agent = Agent(settings, mac)
    _on_termination(agent.stop)
    return agent.run()


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nodefoundry-agent", description="NodeFoundry node agent")
    parser.add_argument("--version", action="version", version=f"nodefoundry-agent {__version__}")
    parser.add_argument("--env-file", type=Path, help="read NF_* settings from this file (KEY=VALUE lines)")
    return parser.parse_args(argv)


def _environment(env_file: Path | None) -> tuple[dict[str, str], str | None]:
    if env_file is None:
        return dict(os.environ), None
    try:
        return {**config.read_env_file(env_file), **os.environ}, None
    except (OSError, UnicodeDecodeError) as err:
        return dict(os.environ), f"cannot read --env-file {env_file}: {err}"


def _setup_logging(level: str) -> None:
    """journald stamps each line itself; by hand, the agent adds the time."""
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
    logging.basicConfig(level=level, stream=sys.stderr, format=stamp + "%(levelname)s %(name)s: %(message)s")


def _on_termination(action: Callable[[], None]) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: action())


def _wait_for_mac(stopped: threading.Event) -> str | None:
    """Without NF_MAC the identity is the physical NIC's MAC; early in boot there may be none yet, so keep
    looking instead of exiting into a restart loop. None only when asked to stop meanwhile."""
    while not stopped.is_set():
        mac = netinfo.detect_mac()
        if mac:
            log.info("node identity %s (MAC of the physical network interface)", mac)
            return mac
        log.error("no physical network interface with a MAC found; set NF_MAC; retrying in %.0f s", MAC_RETRY_SECONDS)
        sdnotify.notify("STATUS=waiting for a physical network interface (or NF_MAC)")
        stopped.wait(MAC_RETRY_SECONDS)
    return None


if __name__ == "__main__":
    sys.exit(main())
