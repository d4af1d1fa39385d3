"""Real firmware, real installer: QEMU's e1000 iPXE ROM and Debian 12's netboot installer against the server.

Two VMs boot side by side in the lab (see conftest.py):

* ``dhcp``: an unknown machine. dnsmasq hands its iPXE the server's ``/boot.ipxe``; it registers itself through
  the boot path, waits in the iPXE poll loop, and after ``PUT {"action": "install"}`` loads the installer kernel
  and initrd, fetches its preseed with the install token and reports back from ``preseed/early_command``.
* ``static``: registered through the API with ip/netmask/gateway/dns and set to install before it boots. iPXE
  still uses DHCP, but the installer must apply the static address from the kernel command line and fetch the
  preseed (and call back) from it.

The mirror is a closed port on the server address, so the installer stops at the mirror step and nothing leaves
the lab's network namespaces. Every stage has its own generous deadline (QEMU runs in TCG, on a machine that may
be busy). The table of stages reached, with times relative to the VMs' start, is printed at the end
(``pytest -s``), attached to the test report and written to ``stages.txt`` in the test's temporary directory,
also when the test fails.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any

from tests.e2e.observe import (
    Stages,
    event_time,
    events,
    random_macs,
    requests_for,
    serial_tail,
    serial_text,
    syslog_matches,
    wait_event,
    wait_request,
)

if TYPE_CHECKING:
    from tests.e2e.conftest import Lab

POLL_INTERVAL = 5  # the server's default NF_BOOT_POLL_INTERVAL
PICKUP_MARGIN = 20  # seconds beyond one poll interval for the installing script to be fetched
FIRST_BOOT_DEADLINE = 120  # VM start -> /boot.ipxe (SeaBIOS, iPXE DHCP under TCG)
KERNEL_DEADLINE = 120  # install trigger -> kernel and initrd (about 49 MB through the emulated e1000)
INSTALLER_DEADLINE = 300  # initrd fetched -> preseed fetched (kernel boot, hw-detect, netcfg)
STARTED_DEADLINE = 180  # preseed fetched -> early_command's "started"
PROGRESS_DEADLINE = 120  # "started" -> a main-menu phase (the watcher polls the installer's syslog every 10 s)
MIRROR_DEADLINE = 120  # optional: the installer reaching the mirror error
FAILED_GRACE = 30  # optional: after the mirror error, time for the watcher to report "failed"
OPTIONAL_BUDGET = 330  # seconds from the VMs' start after which optional stages are no longer waited for
STATIC_HOST = 200  # the static node's address in the lab's /24, outside dnsmasq's .50-.150 pool

QUEUED_PHASES = {"queued", "preseed-fetched", "started"}
MENU_ITEM = re.compile(r"main-menu\[\d+\]: .*Menu item '([^']+)' selected")
MENU_FAILURE = re.compile(r"main-menu\[\d+\]: .*Configuring '([^']+)' failed with error code")
MIRROR_WARNING = re.compile(r"choose-mirror\[\d+\]: WARNING \*\*: mirror does not support the specified release")


def test_real_ipxe_and_debian_installer(lab: Lab, stages: Stages) -> None:
    (dhcp_qemu_mac, mac), (static_qemu_mac, static_mac) = random_macs(2)
    static_ip = f"{lab.subnet}.{STATIC_HOST}"
    stages.notes.append(f"server {lab.base_url}; mirror {lab.server_ip}:9 (closed); artifacts {lab.workdir}")

    # e (set-up). The static node is registered, PATCHed with its network and told to install before it boots.
    lab.api("POST", "/api/v1/nodes", {"mac": static_mac}, expect=201)
    network = {"ip": static_ip, "netmask": "255.255.255.0", "gateway": lab.server_ip, "dns": [lab.server_ip]}
    patched = lab.api("PATCH", f"/api/v1/nodes/{static_mac}", network)
    assert {key: patched.get(key) for key in network} == network, patched
    lab.api("PUT", f"/api/v1/nodes/{static_mac}", {"action": "install"})

    stages.start = time.time()
    serial = lab.start_qemu(dhcp_qemu_mac, "qemu-dhcp")
    static_serial = lab.start_qemu(static_qemu_mac, "qemu-static")
    stages.reached("both VMs started", stages.start, f"dhcp {mac}, static {static_mac} ({static_ip}); TCG, 1 GiB")

    # a. DHCP (dnsmasq) -> iPXE fetches the entry script, then asks again with its MAC and arch.
    own = wait_request(
        lab,
        rf"^/boot\.ipxe\?mac={mac}&arch=(x86_64|i386)&platform=pcbios$",
        FIRST_BOOT_DEADLINE,
        "iPXE to fetch /boot.ipxe?mac=<mac>&arch=...",
    )
    vm_ip = own.client
    entry = requests_for(lab, r"^/boot\.ipxe$", client=vm_ip)
    assert entry and entry[0].at <= own.at, f"no plain /boot.ipxe from {vm_ip} before {own.target}"
    assert lab.leased_ip(dhcp_qemu_mac) == vm_ip, f"dnsmasq did not lease {vm_ip} to {dhcp_qemu_mac}"
    stages.reached("[dhcp] GET /boot.ipxe", entry[0].at, f"from {vm_ip} (dnsmasq lease)")
    stages.reached("[dhcp] GET /boot.ipxe?mac=", own.at, own.target)
    node = lab.api("GET", f"/api/v1/nodes/{mac}")
    assert node["status"] == "discovered", node
    registered = events(lab, mac)[0]
    assert (registered["source"], registered["kind"], registered["new"]) == ("boot", "registered", "discovered")
    stages.reached(
        "[dhcp] auto-registered", event_time(registered), f"status discovered, event source {registered['source']!r}"
    )

    # b. The wait loop re-fetches the node's own script every poll interval.
    own_script = rf"^/boot/{mac}/boot\.ipxe$"
    second = wait_request(lab, own_script, 3 * POLL_INTERVAL + 30, "two wait-loop polls", count=2)
    first = requests_for(lab, own_script)[0]
    stages.reached("[dhcp] wait loop polled 2x", second.at, f"/boot/{mac}/boot.ipxe, gap {second.at - first.at:.1f} s")

    # c. Install: the next poll gets the installing script, then the kernel and the initrd.
    put_at = time.time()
    installing = lab.api("PUT", f"/api/v1/nodes/{mac}", {"action": "install"})
    assert installing["status"] == "installing", installing
    stages.reached("[dhcp] PUT action=install", put_at)
    pickup = wait_request(lab, own_script, POLL_INTERVAL + PICKUP_MARGIN, "the installing script", since=put_at)
    stages.reached("[dhcp] installing script fetched", pickup.at, f"+{pickup.at - put_at:.1f} s after PUT")
    kernel = wait_request(
        lab, r"^/assets/debian-installer/amd64/linux$", KERNEL_DEADLINE, "the kernel", since=put_at, client=vm_ip
    )
    stages.reached("[dhcp] kernel fetched", kernel.at, f"+{kernel.at - put_at:.1f} s after PUT")
    initrd = wait_request(
        lab, r"^/assets/debian-installer/amd64/initrd\.gz$", KERNEL_DEADLINE, "the initrd", since=put_at, client=vm_ip
    )
    stages.reached("[dhcp] initrd.gz fetched", initrd.at, f"+{initrd.at - put_at:.1f} s after PUT")
    stages.notes.append(
        f"install trigger -> installing script {pickup.at - put_at:.1f} s, -> kernel {kernel.at - put_at:.1f} s,"
        f" -> initrd {initrd.at - put_at:.1f} s (poll interval {POLL_INTERVAL} s; times are when the access-log"
        " line was read, i.e. at the end of each response)"
    )

    # d. The real installer boots, fetches its preseed with the install token and reports back.
    preseed = wait_request(
        lab,
        rf"^/preseed/{mac}/preseed\.cfg\?token=[A-Za-z0-9._~-]+$",
        INSTALLER_DEADLINE,
        "the installer to fetch its preseed",
        since=initrd.at,
    )
    classes = lab.dhcp_vendor_classes(dhcp_qemu_mac)
    stages.reached("[dhcp] preseed fetched", preseed.at, f"from {preseed.client}; DHCP vendor classes {classes}")
    lease = lab.leased_ip(dhcp_qemu_mac)
    assert preseed.client == lease, f"preseed fetched from {preseed.client}, dnsmasq's lease is {lease}"
    assert "d-i" in classes, f"dnsmasq saw no DHCP from the installer (vendor class d-i): {classes}"
    fetched = wait_event(lab, mac, lambda e: e["new"] == "preseed-fetched", 10, "event preseed-fetched")
    assert fetched["kind"] == "installer-progress", fetched
    started = wait_event(
        lab, mac, lambda e: e["kind"] == "installer-started", STARTED_DEADLINE, "early_command's 'started'"
    )
    stages.reached("[dhcp] installer-started", event_time(started), "event installer-started (early_command)")

    # e. The static node (booted at the same time, straight into the installer): iPXE used a DHCP lease,
    #    the installer its static address. Checked here, before the DHCP node's later stages.
    static_own = wait_request(lab, rf"^/boot\.ipxe\?mac={static_mac}&", 10, "the static VM's boot script")
    stages.reached("[static] GET /boot.ipxe?mac=", static_own.at, f"from {static_own.client} (DHCP, iPXE)")
    assert static_own.client != static_ip
    static_preseed = wait_request(
        lab, rf"^/preseed/{static_mac}/preseed\.cfg\?token=", INSTALLER_DEADLINE, "the static VM's preseed fetch"
    )
    stages.reached("[static] preseed fetched", static_preseed.at, f"from {static_preseed.client}")
    if static_preseed.client != static_ip:
        stages.notes.append("[static] serial console:\n" + serial_tail(static_serial))
    assert static_preseed.client == static_ip, f"preseed came from {static_preseed.client}, not the static {static_ip}"
    static_started = wait_event(
        lab, static_mac, lambda e: e["kind"] == "installer-started", STARTED_DEADLINE, "the static VM's 'started'"
    )
    assert static_started["detail"]["remote_addr"] == static_ip, static_started
    static_classes = lab.dhcp_vendor_classes(static_qemu_mac)
    assert "d-i" not in static_classes, f"the static node's installer used DHCP: {static_classes}"
    stages.notes.append(f"[static] DHCP vendor classes seen by dnsmasq: {static_classes} (no 'd-i': no installer DHCP)")
    stages.reached(
        "[static] installer-started",
        event_time(static_started),
        f"callback from {static_started['detail']['remote_addr']}",
    )

    def watcher_report() -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
        seen = events(lab, mac)
        progress = [e for e in seen if e["kind"] == "installer-progress" and e["new"] not in QUEUED_PHASES]
        failed = [e for e in seen if e["kind"] == "installer-failed"]
        return (progress, failed) if progress or failed else None

    progress, failed = lab.wait_until(
        watcher_report, PROGRESS_DEADLINE, "a main-menu phase (or a failure) from early_command", "server", 1.0
    )
    menu = [f"{m[1]}" for _, line in syslog_matches(lab, MENU_ITEM, preseed.client) if (m := MENU_ITEM.search(line))]
    stages.notes.append(f"[dhcp] main-menu items in the installer's syslog: {', '.join(menu) or 'none'}")
    if failed:
        # Legitimate only if the installer really failed: a main-menu step error, or the closed mirror
        # (choose-mirror then waits at a dialog; its warning is the only sign in the log).
        phase = (failed[0].get("detail") or {}).get("phase")
        genuine = syslog_matches(lab, MENU_FAILURE, preseed.client) + syslog_matches(
            lab, MIRROR_WARNING, preseed.client
        )
        assert genuine, f"the watcher reported 'failed' (phase {phase!r}) with no failure in the installer's syslog"
        assert phase, f"'failed' reported without the failing step: {failed[0]}"
    if progress:
        stages.reached(
            "[dhcp] installer-progress", event_time(progress[0]), f"phases {', '.join(e['new'] for e in progress)}"
        )

    # The mirror is closed: the installer stops there. A "failed" report is recorded, not required; these
    # optional waits only use what is left of the run's time budget.
    def failed_events() -> list[dict[str, Any]]:
        return [e for e in events(lab, mac) if e["kind"] == "installer-failed"]

    def mirror_error() -> bool:
        return "Bad archive mirror" in serial_text(serial) or bool(failed_events())

    def budget(deadline: float) -> float:
        return max(5.0, min(deadline, stages.start + OPTIONAL_BUDGET - time.time()))

    try:
        lab.wait_until(mirror_error, budget(MIRROR_DEADLINE), "the mirror error", "server", 2.0)
        if "Bad archive mirror" in serial_text(serial):
            stages.reached("[dhcp] mirror error on console", None, "'Bad archive mirror' dialog (closed port)")
        failures = lab.wait_until(failed_events, budget(FAILED_GRACE), "installer-failed", "server", 2.0)
    except AssertionError:
        failures = failed_events()
    node = lab.api("GET", f"/api/v1/nodes/{mac}")
    reported = [e["new"] for e in events(lab, mac) if e["kind"] in ("installer-started", "installer-progress")]
    stages.notes.append(f"[dhcp] install phases reported to the server: {', '.join(reported)}")
    if failures:
        phase = (failures[0].get("detail") or {}).get("phase")
        stages.reached("[dhcp] installer-failed", event_time(failures[0]), f"status {node['status']}, phase {phase!r}")
        assert node["status"] == "failed", node
        assert phase, f"'failed' reported without the failing step: {failures[0]}"
    else:
        last = events(lab, mac)[-1]
        stages.missed(
            "[dhcp] installer-failed",
            f"not reported; node {node['status']!r}, last event {last['kind']} {last['new']!r} at {last['at']}",
        )
        stages.notes.append("[dhcp] serial console at the end:\n" + serial_tail(serial))
