"""The TFTP server in this process, on loopback, driven datagram by datagram with a raw UDP socket.

Timing claims are one-sided: a test that says "no answer" waits a second for one that would come at
once if the server were wrong, and a test that waits for an answer allows many seconds.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodefoundry_server.config import Config, ConfigError, load
from nodefoundry_server.store import Store
from nodefoundry_server.tftp import TftpServer, TftpService, packets, preflight
from nodefoundry_server.tftp import server as server_module
from tests.conftest import free_port

WAIT = 10.0
CONTENT = bytes(range(256)) * 10 + b"end"  # 2563 bytes


def make_config(tmp_path: Path, port: int, **extra: str) -> Config:
    ipxe = tmp_path / "ipxe"
    ipxe.mkdir(exist_ok=True)
    (ipxe / "file.bin").write_bytes(CONTENT)
    (ipxe / "text.txt").write_bytes(b"one\ntwo\r\n")
    environ = {"NF_TFTP_ADDR": f"127.0.0.1:{port}", "NF_TFTP_IPXE_DIR": str(ipxe), "NF_ASSETS_DIR": str(tmp_path)}
    return load(environ=environ | extra)


@pytest.fixture
def tftp(tmp_path: Path) -> Iterator[TftpServer]:
    server = TftpServer(make_config(tmp_path, free_port()), max_transfers=2)
    server.start()
    yield server
    server.stop()


class Client:
    """A UDP socket that speaks TFTP by hand."""

    def __init__(self, server: tuple[str, int], timeout: float = WAIT) -> None:
        self.server = server
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(timeout)
        self.peer: tuple[str, int] | None = None

    def send_raw(self, data: bytes) -> None:
        self.sock.sendto(data, self.server)

    def request(self, filename: str, mode: str = "octet", options: dict[str, str] | None = None) -> None:
        self.send_raw(packets.request_packet(packets.RRQ, filename, mode, options))

    def receive(self) -> bytes:
        data, self.peer = self.sock.recvfrom(65536)
        return data

    def silent_for(self, seconds: float) -> bool:
        self.sock.settimeout(seconds)
        try:
            self.receive()
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(WAIT)
        return False

    def send(self, data: bytes) -> None:
        assert self.peer is not None
        self.sock.sendto(data, self.peer)

    def download(self, filename: str, options: dict[str, str] | None = None, mode: str = "octet") -> bytes:
        """Fetch a whole file; answer an OACK with ACK 0, each DATA with its ACK."""
        self.request(filename, mode, options)
        blksize = int((options or {}).get("blksize", 512))
        received = b""
        while True:
            packet = self.receive()
            code = packets.opcode(packet)
            if code == packets.OACK:
                self.send(packets.ack_packet(0))
                continue
            assert code == packets.DATA, packets.parse_error(packet)
            block = struct.unpack("!H", packet[2:4])[0]
            received += packet[4:]
            self.send(packets.ack_packet(block))
            if len(packet) - 4 < blksize:
                return received

    def close(self) -> None:
        self.sock.close()


def oack(packet: bytes) -> dict[str, str]:
    assert packets.opcode(packet) == packets.OACK, packet
    fields = packet[2:-1].decode().split("\0")
    return dict(zip(fields[::2], fields[1::2], strict=True))


def error(packet: bytes) -> tuple[int, str]:
    assert packets.opcode(packet) == packets.ERROR, packet
    return packets.parse_error(packet)


def wait_idle(server: TftpServer) -> None:
    deadline = time.monotonic() + WAIT
    while server.active_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.active_threads()


def test_plain_rrq_without_options(tftp: TftpServer) -> None:
    client = Client(tftp.address)
    assert client.download("file.bin") == CONTENT
    assert client.peer is not None and client.peer[1] != tftp.address[1]  # a transfer has its own port
    wait_idle(tftp)
    assert tftp.counters.sent == 1


def test_options_are_acknowledged_and_tsize_is_the_real_size(tftp: TftpServer) -> None:
    client = Client(tftp.address)
    client.request("/file.bin", options={"blksize": "100", "tsize": "0", "timeout": "3", "windowsize": "4"})
    assert oack(client.receive()) == {"blksize": "100", "tsize": str(len(CONTENT)), "timeout": "3"}
    client.send(packets.ack_packet(0))
    first = client.receive()
    assert first[:4] == b"\x00\x03\x00\x01" and first[4:] == CONTENT[:100]
    client.send(packets.error_packet(packets.ErrorCode.NOT_DEFINED, "enough"))
    wait_idle(tftp)
    assert tftp.counters.aborted == 1


def test_block_size_lowered_to_the_maximum(tftp: TftpServer) -> None:
    client = Client(tftp.address)
    client.request("file.bin", options={"blksize": "70000"})
    assert oack(client.receive()) == {"blksize": "65464"}
    client.send(packets.ack_packet(0))
    assert client.receive()[4:] == CONTENT


def test_size_probe_then_download_like_a_pxe_rom(tftp: TftpServer) -> None:
    probe = Client(tftp.address)
    probe.request("file.bin", options={"tsize": "0"})
    assert oack(probe.receive())["tsize"] == str(len(CONTENT))
    probe.send(packets.error_packet(packets.ErrorCode.OPTION_REFUSED, "User aborted the transfer"))
    assert Client(tftp.address).download("file.bin", {"blksize": "1468"}) == CONTENT


def test_a_lost_data_packet_is_sent_again(tftp: TftpServer) -> None:
    client = Client(tftp.address)
    client.request("file.bin", options={"timeout": "1"})
    client.receive()  # OACK
    client.send(packets.ack_packet(0))
    first = client.receive()
    assert client.receive() == first  # no ACK from us: the same block again after the timeout
    client.send(packets.ack_packet(1))
    assert client.receive()[:4] == b"\x00\x03\x00\x02"


def test_a_duplicate_ack_does_not_trigger_a_resend(tftp: TftpServer) -> None:
    client = Client(tftp.address)
    client.request("file.bin", options={"timeout": "255"})
    client.receive()
    client.send(packets.ack_packet(0))
    assert client.receive()[:4] == b"\x00\x03\x00\x01"
    client.send(packets.ack_packet(0))  # late duplicate of the OACK's ACK
    assert client.silent_for(1.0)
    client.send(packets.ack_packet(1))
    assert client.receive()[:4] == b"\x00\x03\x00\x02"


def test_retries_are_bounded(tftp: TftpServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "RETRIES", 2)
    client = Client(tftp.address)
    client.request("file.bin", options={"timeout": "1"})
    copies = 0
    while not client.silent_for(3.0):
        copies += 1
    assert copies == 3  # the OACK, then two resends
    wait_idle(tftp)
    assert tftp.counters.failed == 1


def test_file_not_found_and_traversal(tftp: TftpServer) -> None:
    client = Client(tftp.address)
    client.request("missing.bin")
    assert error(client.receive()) == (1, "missing.bin not found")
    client.request("../../etc/passwd")
    assert error(client.receive())[0] == 2
    client.request("/etc/passwd")
    assert error(client.receive())[0] == 1
    wait_idle(tftp)
    assert tftp.counters.rejected == 3


def test_write_requests_and_unknown_modes_are_refused(tftp: TftpServer) -> None:
    client = Client(tftp.address)
    client.send_raw(packets.request_packet(packets.WRQ, "upload.bin"))
    assert error(client.receive()) == (2, "read-only server: write requests are refused")
    client.request("file.bin", mode="mail")
    assert error(client.receive())[0] == 4


@pytest.mark.parametrize(
    "datagram",
    [b"", b"\x00", b"\x00\x01no-nul", b"\x00\x09junk", b"\x00\x04\x00\x01", b"\x00\x03\x00\x01data", b"\xff" * 600],
)
def test_malformed_datagrams_get_illegal_operation_and_the_server_keeps_serving(
    tftp: TftpServer, datagram: bytes
) -> None:
    client = Client(tftp.address)
    client.send_raw(datagram)
    if datagram:  # an empty datagram carries no opcode to answer
        assert error(client.receive())[0] == 4
    assert Client(tftp.address).download("file.bin") == CONTENT
    assert tftp.counters.malformed == 1


def test_an_error_packet_is_never_answered(tftp: TftpServer) -> None:
    client = Client(tftp.address)
    client.send_raw(packets.error_packet(packets.ErrorCode.NOT_DEFINED, "hello"))
    assert client.silent_for(1.0)
    assert tftp.counters.malformed == 1


def test_a_repeated_request_does_not_start_a_second_transfer(tftp: TftpServer) -> None:
    client = Client(tftp.address)
    client.request("file.bin", options={"timeout": "255"})
    client.request("file.bin", options={"timeout": "255"})
    oack(client.receive())
    assert client.silent_for(1.0)
    assert len(tftp.active_threads()) == 1


def test_transfers_beyond_the_limit_are_refused_with_an_error(tftp: TftpServer) -> None:
    holders = [Client(tftp.address) for _ in range(2)]
    for holder in holders:
        holder.request("file.bin", options={"timeout": "255"})
        oack(holder.receive())
    late = Client(tftp.address)
    late.request("file.bin")
    assert error(late.receive()) == (0, "server busy: 2 transfers running, try again")
    for holder in holders:
        holder.send(packets.error_packet(packets.ErrorCode.NOT_DEFINED, "done"))
    wait_idle(tftp)
    assert late.download("file.bin") == CONTENT
    assert tftp.counters.refused == 1


def test_netascii_converts_line_ends_and_tsize(tftp: TftpServer) -> None:
    client = Client(tftp.address)
    client.request("text.txt", mode="netascii", options={"tsize": "0"})
    assert oack(client.receive())["tsize"] == str(len(b"one\r\ntwo\r\0\r\n"))
    client.send(packets.ack_packet(0))
    assert client.receive()[4:] == b"one\r\ntwo\r\0\r\n"


def test_the_answer_comes_from_the_address_the_request_went_to(tmp_path: Path) -> None:
    """Bound to all addresses, a request to 127.0.0.2 is answered from 127.0.0.2 (IP_PKTINFO)."""
    port = free_port()
    server = TftpServer(make_config(tmp_path, port, NF_TFTP_ADDR=f":{port}"), max_transfers=4)
    server.start()
    try:
        client = Client(("127.0.0.2", port))
        client.request("file.bin", options={"tsize": "0"})
        client.receive()
        assert client.peer is not None and client.peer[0] == "127.0.0.2"
        refused = Client(("127.0.0.3", port))
        refused.send_raw(packets.request_packet(packets.WRQ, "x"))
        refused.receive()
        assert refused.peer is not None and refused.peer[0] == "127.0.0.3"
    finally:
        server.stop()


def test_grub_config_over_tftp_points_at_this_server_http_port(tmp_path: Path) -> None:
    port = free_port()
    server = TftpServer(make_config(tmp_path, port, NF_TFTP_ADDR=f":{port}", NF_HTTP_ADDR=":8123"), max_transfers=4)
    server.start()
    try:
        text = Client(("127.0.0.5", port)).download("/debian-installer/arm64/grub/grub.cfg")
        assert b"set nodefoundry_server='(http,127.0.0.5:8123)'" in text
    finally:
        server.stop()
    with_server_addr = TftpServer(make_config(tmp_path, port, NF_SERVER_ADDR="boot.lab:80"), max_transfers=1)
    assert with_server_addr.http_base("127.0.0.1") == "http://boot.lab:80"


def test_service_reports_to_the_store_and_stops(tmp_path: Path) -> None:
    store = Store(tmp_path / "nodes.db")
    store.open()
    service = TftpService(make_config(tmp_path, free_port()), store)
    service.start()
    assert Client(service.server.address).download("file.bin") == CONTENT
    started = time.monotonic()
    service.stop()
    assert time.monotonic() - started < 8
    component = store.components()["tftp"]
    assert component["state"] == "ok" and component["detail"].startswith("listening on 127.0.0.1:")


def test_preflight_names_the_setting_when_the_port_is_taken(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as raised:
            preflight(make_config(tmp_path, port))
    assert str(raised.value) == f"NF_TFTP_ADDR: cannot listen on 127.0.0.1:{port}: Address already in use"
    preflight(load(environ={}))  # TFTP off (no DHCP, no address): nothing to check
