"""The agent's MQTT session against a real Mosquitto: birth, will, facts, heartbeat, reconnects, shutdown.

Every test runs twice: the package under the venv's Python (paho 2.x) and the zipapp under Debian's
/usr/bin/python3 (paho 1.6).
"""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

from nodefoundry_agent import __version__, netinfo, protocol
from tests.integration import test_agent_harness as harness
from tests.integration.test_agent_harness import MAC, AgentProcess, Broker, Node, Observer, online, wait_for

pyz_path, agent_argv, broker, observer, node, agents = (harness.pyz_path, harness.agent_argv, harness.broker,
                                                         harness.observer, harness.node, harness.agents)  # fmt: skip

RSS_BUDGET_KB = 30 * 1024


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_birth_facts_and_status_are_published_on_connect(agents, observer: Observer, node: Node, broker: Broker):
    agents()
    birth = online(observer)
    assert protocol.parse_state(protocol.encode(birth))["session"] == birth["session"]
    facts = observer.wait(protocol.FACTS)
    assert facts["mac"] == MAC and facts["agent_version"] == __version__
    assert facts["boot_id"] == node.boot_id_file.read_text().strip()
    assert facts["arch"] in ("amd64", "arm64") and facts["cpu"]["count"] >= 1 and facts["memory_bytes"] > 0
    assert facts["os"]["id"] == "debian" and facts["kernel"] and facts["hostname"]
    assert isinstance(facts["disks"], list) and isinstance(facts["interfaces"], list)
    # Heartbeats keep coming (NF_HEARTBEAT_INTERVAL=1) and parse with the server's own parser.
    wait_for(lambda: len(observer.seen(protocol.STATUS)) >= 3, "three statuses")
    for status in observer.seen(protocol.STATUS):
        parsed = protocol.parse_status(protocol.encode(status))
        assert parsed["session"] == birth["session"] and parsed["agent_version"] == __version__
        assert parsed["ip"] == "127.0.0.1" and parsed["status"] == "installed"
    # Birth and facts are retained: a client that subscribes later gets them at once.
    late = Observer(broker.port)
    try:
        assert online(late)["session"] == birth["session"]
        late.wait(protocol.FACTS)
        assert all(retained for topic, _, retained in late.messages if not topic.endswith("/status"))
    finally:
        late.close()


def test_sigkill_makes_the_broker_publish_the_will_of_the_same_session(agents, observer: Observer):
    agent = agents()
    birth = online(observer)
    agent.kill()
    will = observer.wait(protocol.STATE, lambda body: body["state"] == "offline")
    assert will["session"] == birth["session"]


def test_sigterm_publishes_offline_and_exits_0(agents, observer: Observer, broker: Broker):
    agent = agents()
    birth = online(observer)
    # The will carries the time of the connect; wait until the agent's clock is past it, so the offline
    # state below can only be the agent's own goodbye (a clean disconnect makes the broker drop the will).
    observer.wait(protocol.STATUS, lambda status: status["timestamp"] > birth["timestamp"])
    assert agent.terminate() == 0, agent.output()
    goodbye = observer.wait(protocol.STATE, lambda body: body["state"] == "offline")
    assert goodbye["session"] == birth["session"] and goodbye["timestamp"] > birth["timestamp"]
    assert "agent stopped" in agent.output()
    late = Observer(broker.port)  # the offline state is retained
    try:
        assert late.wait(protocol.STATE)["state"] == "offline"
    finally:
        late.close()


def test_a_new_process_gets_a_new_session(agents, observer: Observer):
    first = agents()
    session = online(observer)["session"]
    first.terminate()
    agents()
    assert online(observer, after=len(observer.seen(protocol.STATE)))["session"] != session


def test_agent_keeps_retrying_while_the_broker_is_down_and_connects_when_it_comes_up(agents, broker: Broker):
    broker.stop()
    agent = agents()
    wait_for(lambda: agent.output().count("cannot connect to the broker") >= 3, "three failed connection attempts")
    assert agent.alive()
    broker.start()
    late = Observer(broker.port)
    try:
        online(late)
        late.wait(protocol.STATUS)
    finally:
        late.close()


def test_broker_restart_reconnects_resubscribes_and_never_runs_a_command_twice(agents, observer, broker, node):
    runs = node.root / "runs.log"
    node.tool("count", f"echo run >> {runs}\n")
    agent = agents()
    session = online(observer)["session"]
    first = observer.command("exec", {"name": "count"})
    assert observer.final(first)["state"] == "succeeded"

    births = len(observer.seen(protocol.STATE))
    broker.stop()
    wait_for(lambda: "lost the connection" in agent.output(), "the agent noticing the broker is gone")
    broker.start()
    assert online(observer, after=births)["session"] == session  # same process, same session
    results = len(observer.seen(protocol.RESULT, first))
    observer.command("exec", {"name": "count"}, cmd_id=first)  # the same command delivered again
    assert observer.final(first, after=results)["state"] == "succeeded"
    second = observer.command("exec", {"name": "count"})  # a new one still arrives: re-subscribed
    assert observer.final(second)["state"] == "succeeded"
    assert lines(runs) == ["run", "run"]

    agent.terminate()  # and across a restart of the agent: the ledger is on disk
    births = len(observer.seen(protocol.STATE))
    restarted = agents()
    assert online(observer, after=births)["session"] != session
    results = len(observer.seen(protocol.RESULT, first))
    observer.command("exec", {"name": "count"}, cmd_id=first)
    assert observer.final(first, after=results)["state"] == "succeeded"
    assert lines(runs) == ["run", "run"]
    assert f"command {first} delivered again" in restarted.output()


def test_a_result_finished_while_offline_is_delivered_after_reconnect(agents, observer, broker, node):
    go = node.root / "go"
    node.tool("wait-for-go", f"while [ ! -e {go} ]; do sleep 0.05; done\necho went\n")
    agent = agents()
    online(observer)
    cmd_id = observer.command("exec", {"name": "wait-for-go", "timeout": 120})
    observer.wait(protocol.RESULT, lambda body: body["state"] == "running", cmd_id)
    observer.wait(protocol.STATUS, after=len(observer.seen(protocol.STATUS)) + 1)  # the loop goes on meanwhile
    broker.stop()
    wait_for(lambda: "lost the connection" in agent.output(), "the agent noticing the broker is gone")
    go.touch()
    wait_for(lambda: f"command {cmd_id} (exec) succeeded" in agent.output(), "the command finishing offline")
    # The result is not retained and the restarted broker keeps no sessions: the observer must subscribe again
    # before the agent reconnects and publishes it, so the agent is held (SIGSTOP) until then.
    agent.signal(signal.SIGSTOP)
    subscriptions = observer.subscriptions
    broker.start()
    observer.wait_subscribed(after=subscriptions)
    agent.signal(signal.SIGCONT)
    result = observer.final(cmd_id)
    assert result["state"] == "succeeded" and result["stdout"] == "went\n"


def test_tls_with_a_private_ca(agents, node: Node, tmp_path: Path):
    """NF_MQTT_TLS with NF_MQTT_CA_FILE: the broker's certificate is verified against that CA."""
    ca, certificate, key = issue_certificates(tmp_path / "tls")
    other_ca, _, _ = issue_certificates(tmp_path / "other")
    tls = Broker(tmp_path / "tls", f"cafile {ca}\ncertfile {certificate}\nkeyfile {key}\n").start()
    try:
        agents(NF_MQTT_BROKER=f"localhost:{tls.port}", NF_MQTT_TLS="true", NF_MQTT_CA_FILE=str(ca))
        untrusting = agents(NF_MAC="02a0b0c0d0e2", NF_MQTT_BROKER=f"localhost:{tls.port}", NF_MQTT_TLS="true",
                            NF_MQTT_CA_FILE=str(other_ca))  # fmt: skip
        watcher = Observer(tls.port, tls_ca=ca)
        try:
            assert online(watcher)["session"]
            watcher.wait(protocol.STATUS)
            wait_for(lambda: "certificate verify failed" in untrusting.output(), "a refused certificate")
            assert untrusting.alive()
        finally:
            watcher.close()
    finally:
        tls.stop()


def issue_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate it signed for localhost."""
    directory.mkdir()
    ca, ca_key, csr = directory / "ca.pem", directory / "ca.key", directory / "server.csr"
    certificate, key, extensions = directory / "server.pem", directory / "server.key", directory / "san.ext"
    extensions.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for argv in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-subj", "/CN=test CA"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=localhost"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", certificate, "-days", "2",
         "-extfile", extensions],
    ):  # fmt: skip
        subprocess.run(["openssl", *map(str, argv)], check=True, capture_output=True)
    return ca, certificate, key


def test_memory_after_start_is_within_budget(agents, observer: Observer):
    agent = agents()
    online(observer)
    observer.wait(protocol.STATUS)
    status = Path(f"/proc/{agent.pid}/status").read_text()
    rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    assert rss_kb <= RSS_BUDGET_KB, f"VmRSS {rss_kb} kB"


def test_systemd_notify_protocol(agents, observer: Observer, tmp_path: Path):
    """Type=notify: READY=1 at start, STATUS= on connect, STOPPING=1 on SIGTERM, sent to $NOTIFY_SOCKET."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify"))
        notify.settimeout(harness.WAIT_SECONDS)
        agent = agents(NOTIFY_SOCKET=str(tmp_path / "notify"))
        received = [notify.recv(4096).decode() for _ in range(2)]
        assert received[0] == "READY=1" and received[1].startswith("STATUS=connected to the broker")
        online(observer)
        agent.terminate()
        assert notify.recv(4096).decode() == "STOPPING=1"


def test_env_file_and_a_bad_nf_mac(agent_argv: list[str], broker: Broker, node: Node, tmp_path: Path):
    """``--env-file`` as when run by hand; an invalid NF_MAC is reported and the NIC's MAC used instead."""
    detected = netinfo.detect_mac()
    assert detected, "this test needs a physical network interface"
    env_file = tmp_path / "nodefoundry-agent"
    env_file.write_text("".join(f"{key}={value}\n" for key, value in node.env(broker.port).items() if key != "PATH"))
    watcher = Observer(broker.port, mac=detected)
    agent = AgentProcess([*agent_argv, "--env-file", str(env_file)], {"PATH": "/usr/bin:/bin", "NF_MAC": "nonsense"},
                         tmp_path / "by-hand.log").start()  # fmt: skip
    try:
        online(watcher)
        assert "NF_MAC='nonsense' is invalid" in agent.output()
        assert watcher.wait(protocol.FACTS)["mac"] == detected
    finally:
        watcher.close()
        assert agent.terminate() == 0
