"""Races between writers and kill -9 in the middle of a write storm, on a real server and SQLite file."""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from tests.conftest import ADMIN_TOKEN

HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _blast(url: str, method: str, payloads: list[dict], workers: int = 16) -> list[requests.Response]:
    """Send all requests at once from many threads (a barrier lines them up)."""
    barrier = threading.Barrier(len(payloads))

    def send(payload: dict) -> requests.Response:
        with requests.Session() as session:
            barrier.wait(timeout=30)
            return session.request(method, url, json=payload, headers=HEADERS, timeout=60)

    with ThreadPoolExecutor(max_workers=len(payloads)) as pool:
        return list(pool.map(send, payloads))


def test_concurrent_installs_have_exactly_one_winner(server):
    macs = [f"0c00000000{i:02x}" for i in range(5)]
    for mac in macs:
        assert server.api("POST", "/api/v1/nodes", json={"mac": mac}).status_code == 201
    for mac in macs:
        responses = _blast(f"{server.url}/api/v1/nodes/{mac}", "PUT", [{"action": "install"}] * 24)
        codes = sorted(r.status_code for r in responses)
        assert codes.count(200) == 1 and codes.count(400) == 23, codes
        events = server.api("GET", f"/api/v1/nodes/{mac}/events").json()
        assert [e["kind"] for e in events] == ["registered", "install"]


def test_concurrent_bulk_calls_change_each_node_once(server):
    macs = [f"0d0000000{i:03x}" for i in range(200)]
    for mac in macs:
        server.api("POST", "/api/v1/nodes", json={"mac": mac})
    responses = _blast(f"{server.url}/api/v1/nodes/bulk", "POST", [{"action": "install", "macs": macs}] * 8)
    changed = [r for resp in responses for r in resp.json()["results"] if r["changed"]]
    assert sorted(r["mac"] for r in changed) == sorted(macs)  # every node exactly once across 8 racing calls
    assert all(r["ok"] for resp in responses for r in resp.json()["results"])


def test_patch_racing_an_install_never_undoes_it(server):
    """The seed's read-modify-write race: a concurrent save reverted an install."""
    for round_number in range(10):
        mac = f"0e00000000{round_number:02x}"
        server.api("POST", "/api/v1/nodes", json={"mac": mac})
        patches = [{"hostname": f"h{round_number}-{i}"} for i in range(11)]
        url = f"{server.url}/api/v1/nodes/{mac}"
        barrier = threading.Barrier(12)

        def install(url: str = url, barrier: threading.Barrier = barrier) -> int:
            barrier.wait(timeout=30)
            return requests.put(url, json={"action": "install"}, headers=HEADERS, timeout=60).status_code

        def patch(body: dict, url: str = url, barrier: threading.Barrier = barrier) -> int:
            barrier.wait(timeout=30)
            return requests.patch(url, json=body, headers=HEADERS, timeout=60).status_code

        with ThreadPoolExecutor(max_workers=12) as pool:
            futures = [pool.submit(install)] + [pool.submit(patch, body) for body in patches]
            assert all(f.result() == 200 for f in futures)
        node = server.api("GET", f"/api/v1/nodes/{mac}").json()
        assert node["status"] == "installing"
        assert node["hostname"] in {p["hostname"] for p in patches}


def test_store_level_race_across_processes(tmp_path):
    """Eight OS processes race the same transition through lifecycle.start_install_many."""
    import multiprocessing

    from nodefoundry_server import lifecycle
    from nodefoundry_server.store import Store

    path = tmp_path / "race.db"
    store = Store(path)
    store.open()
    macs = [f"0f00000000{i:02x}" for i in range(50)]
    for mac in macs:
        lifecycle.register(store, mac, {}, source="api")
    context = multiprocessing.get_context("spawn")
    with context.Pool(8) as pool:
        results = pool.starmap(_race_worker, [(str(path), macs)] * 8)
    changed = sorted(mac for worker in results for mac in worker)
    assert changed == sorted(macs)
    events = store.conn().execute("SELECT COUNT(*) FROM node_events WHERE kind = 'install'").fetchone()[0]
    assert events == len(macs)


def _race_worker(path: str, macs: list[str]) -> list[str]:
    from nodefoundry_server import lifecycle
    from nodefoundry_server.store import Store

    store = Store(path)
    changed = []
    for mac in random.sample(macs, len(macs)):
        outcomes = lifecycle.start_install_many(store, [mac], "install", source="api")
        changed += [o.mac for o in outcomes if o.changed]
    return changed


def test_kill_9_during_a_write_storm_loses_no_committed_change(server_factory):
    """Writers create and edit nodes; the whole server is SIGKILLed; every acknowledged write survives."""
    server = server_factory().start()
    acknowledged: dict[str, str] = {}  # mac -> hostname the server confirmed
    lock = threading.Lock()
    for crash_round in range(3):
        stop = threading.Event()

        def writer(worker: int, crash_round: int = crash_round, stop: threading.Event = stop) -> None:
            with requests.Session() as session:
                for i in range(10000):  # bounded; normally ended by the crash
                    if stop.is_set():
                        return
                    mac = f"1{crash_round}{worker:02x}{i:08x}"[:12]
                    try:
                        created = session.post(
                            f"{server.url}/api/v1/nodes", json={"mac": mac}, headers=HEADERS, timeout=5
                        )
                        if created.status_code != 201:
                            continue
                        with lock:
                            acknowledged[mac] = ""
                        patched = session.patch(
                            f"{server.url}/api/v1/nodes/{mac}",
                            json={"hostname": f"w{worker}n{i}"},
                            headers=HEADERS,
                            timeout=5,
                        )
                        if patched.status_code == 200:
                            with lock:
                                acknowledged[mac] = f"w{worker}n{i}"
                    except requests.RequestException:
                        return

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(1.0 + random.random())
        server.crash()
        stop.set()
        for thread in threads:
            thread.join(timeout=30)

        with sqlite3.connect(server.db_path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        server.start()
        stored = {n["mac"]: n.get("hostname", "") for n in server.api("GET", "/api/v1/nodes").json()}
        with lock:
            missing = [mac for mac in acknowledged if mac not in stored]
            reverted = [mac for mac, host in acknowledged.items() if host and stored.get(mac) != host]
        assert not missing and not reverted
        assert len(acknowledged) > 0
    with sqlite3.connect(server.db_path) as conn:
        registered = conn.execute("SELECT COUNT(DISTINCT mac) FROM node_events WHERE kind = 'registered'").fetchone()[0]
        nodes = conn.execute("SELECT COUNT(*) FROM nodes").fetchone()[0]
    assert registered == nodes  # every stored node has its registration event: they committed together
