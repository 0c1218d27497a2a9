"""The nfnetlink set-element writer: nft's own bytes (known answers), builders, replies, errors. Pure: no socket."""

from __future__ import annotations

import errno
import ipaddress
import json
import socket
import struct
from pathlib import Path

import pytest

from spa.errors import FirewallError
from spa.server.firewall import nfnetlink as nl
from spa.server.netlink import iter_messages, parse_attrs

VECTORS = Path(__file__).parent.parent / "vectors" / "nft-setelem-v1.json"
HDR = struct.Struct("=IHHII")


def _doc():
    return json.loads(VECTORS.read_text(encoding="utf-8"))


def _ops(v) -> list[nl.ElementOp]:
    elems = tuple(
        nl.Element(nl.element_key(ipaddress.ip_address(e["address"]), e["proto"], e["port"]), e["timeout_ms"], e["comment"])
        for e in v["elements"]
    )
    return [nl.ElementOp(v["op"], v["set"], elems)]


def _normalise(batch: bytes, clear_flags: int = 0, drop_set_id: bool = False) -> list[bytes]:
    """Each message with seq and pid zeroed, ``clear_flags`` cleared and (nft's) LIST_SET_ID dropped."""
    out = []
    for mtype, flags, _seq, payload in iter_messages(batch):
        body = bytes(payload)
        if drop_set_id and mtype >> 8 == nl.NFNL_SUBSYS_NFTABLES:
            kept, off = [body[:4]], 4
            while off < len(body):
                length, atype = struct.unpack_from("=HH", body, off)
                step = (length + 3) & ~3
                if atype & 0x3FFF != 4:  # NFTA_SET_ELEM_LIST_SET_ID
                    kept.append(body[off: off + step])
                off += step
            body = b"".join(kept)
        out.append(HDR.pack(HDR.size + len(body), mtype, flags & ~clear_flags, 0, 0) + body)
    return out


@pytest.mark.parametrize("v", _doc()["vectors"], ids=lambda v: v["name"])
def test_batches_are_what_nft_sends(v):
    ours = nl.build_batch(_doc()["table"], _ops(v), seq=0)
    theirs = bytes.fromhex(v["batch"])
    assert _normalise(ours, clear_flags=0x4) == _normalise(theirs, drop_set_id=True)


def test_vectors_cover_both_families_every_op_and_comments():
    vs = _doc()["vectors"]
    assert {v["op"] for v in vs} == {"add", "create", "delete"}
    assert {v["set"] for v in vs} == {"allow4", "allow6"}
    assert any(e["comment"] for v in vs if v["set"] == "allow6" for e in v["elements"])
    assert any(len(v["elements"]) > 1 for v in vs)
    assert all(v["batch"] and v["nft"].startswith("nft ") for v in vs)


# -- builders ---------------------------------------------------------------------


def test_element_key_layout():
    assert nl.element_key(ipaddress.ip_address("192.0.2.2"), "tcp", 22).hex() == "c0000202" "06000000" "00160000"
    k6 = nl.element_key(ipaddress.ip_address("2001:db8::2"), "udp", 65535)
    assert len(k6) == 24 and k6[16:].hex() == "11000000" "ffff0000"
    with pytest.raises(KeyError):
        nl.element_key(ipaddress.ip_address("192.0.2.2"), "sctp", 22)
    with pytest.raises(ValueError):
        nl.element_key(ipaddress.ip_address("192.0.2.2"), "tcp", 70000)


def test_comment_udata_is_nftnl_tlv():
    assert nl.comment_udata("ssh").hex() == "0004" "737368" "00"
    assert nl.comment_udata("") == b"\x00\x01\x00"
    assert len(nl.comment_udata("x" * 254)) == 257
    with pytest.raises(ValueError):
        nl.comment_udata("x" * 255)


@pytest.mark.parametrize(
    "op, mtype, flags",
    [
        ("add", nl.NFT_MSG_NEWSETELEM, 0x1 | 0x4 | 0x400),
        ("create", nl.NFT_MSG_NEWSETELEM, 0x1 | 0x4 | 0x400 | 0x200),
        ("delete", nl.NFT_MSG_DELSETELEM, 0x1 | 0x4),
    ],
)
def test_setelem_message_header_and_attrs(op, mtype, flags):
    key = nl.element_key(ipaddress.ip_address("192.0.2.9"), "tcp", 443)
    msg = nl.setelem_message("spa", nl.ElementOp(op, "allow4", (nl.Element(key, 1500, "d"),)), seq=7)
    [(t, f, seq, payload)] = list(iter_messages(msg))
    assert (t, f, seq) == ((10 << 8) | mtype, flags, 7)
    assert bytes(payload[:4]) == b"\x01\x00\x00\x00"  # inet, v0, res_id 0
    attrs = parse_attrs(payload, 4)
    assert attrs[1] == b"spa\0" and attrs[2] == b"allow4\0"
    elem = parse_attrs(parse_attrs(attrs[3])[1])
    assert struct.unpack(">Q", elem[4])[0] == 1500
    assert parse_attrs(elem[1])[1] == key
    assert elem[6] == nl.comment_udata("d")


def test_element_without_timeout_or_comment_has_key_only():
    key = nl.element_key(ipaddress.ip_address("2001:db8::5"), "tcp", 22)
    msg = nl.setelem_message("t", nl.ElementOp("delete", "allow6", (nl.Element(key),)), seq=1)
    [(_t, _f, _s, payload)] = list(iter_messages(msg))
    elem = parse_attrs(parse_attrs(parse_attrs(payload, 4)[3])[1])
    assert set(elem) == {1}


def test_empty_op_is_refused():
    with pytest.raises(ValueError):
        nl.setelem_message("spa", nl.ElementOp("add", "allow4", ()), seq=1)


def test_batch_frames_messages_with_consecutive_seqs():
    key = nl.element_key(ipaddress.ip_address("192.0.2.2"), "tcp", 22)
    ops = [nl.ElementOp(o, "allow4", (nl.Element(key, 1000),)) for o in ("add", "delete", "add")]
    msgs = list(iter_messages(nl.build_batch("spa", ops, seq=100)))
    assert [(t, s) for t, _f, s, _p in msgs] == [(0x10, 100), (0xA0C, 101), (0xA0E, 102), (0xA0C, 103), (0x11, 104)]
    for t, f, _s, p in (msgs[0], msgs[-1]):
        assert f == 0x1 and bytes(p) == b"\x00\x00\x00\x0a"  # res_id = htons(NFNL_SUBSYS_NFTABLES)


# -- replies ----------------------------------------------------------------------


def _ack(seq: int, err: int = 0) -> bytes:
    body = struct.pack("=i", -err) + HDR.pack(20, 0xA0C, 0x5, seq, 0)
    return HDR.pack(HDR.size + len(body), 2, 0x100, seq, 4242) + body


def test_parse_acks_reads_acks_and_errors():
    assert nl.parse_acks(_ack(5) + _ack(6, errno.EEXIST)) == [(5, 0), (6, errno.EEXIST)]


@pytest.mark.parametrize(
    "data",
    [b"", b"\x01\x02\x03", b"\xff" * 64, _ack(5)[:10], HDR.pack(1000, 2, 0, 5, 0) + b"\0" * 8, HDR.pack(3, 2, 0, 5, 0)],
    ids=["empty", "short", "garbage", "cut-header", "length-too-long", "length-too-small"],
)
def test_parse_acks_never_raises_on_junk(data):
    assert nl.parse_acks(data) == []


def test_truncated_error_payload_is_a_failure():
    assert nl.parse_acks(HDR.pack(18, 2, 0, 9, 0) + b"\0\0") == [(9, errno.EPROTO)]


def test_non_error_messages_are_skipped():
    done = HDR.pack(20, 3, 0, 5, 0) + b"\0" * 4
    assert nl.parse_acks(done + _ack(6)) == [(6, 0)]


def test_outcome_all_acked():
    o = nl.BatchOutcome.expect(10, 3)
    o.feed([(11, 0), (12, 0)])
    assert not o.done
    o.feed([(13, 0)])
    assert o.done and o.failed is None


def test_outcome_first_error_wins_and_stale_replies_are_ignored():
    o = nl.BatchOutcome.expect(10, 2)
    o.feed([(3, errno.ENOENT), (12, errno.EEXIST), (11, errno.ENOENT)])
    assert o.done and o.failed == (12, errno.EEXIST)


def test_outcome_batch_refused_as_a_whole():
    o = nl.BatchOutcome.expect(10, 2)
    o.feed([(10, errno.EPERM)])
    assert o.done and o.failed == (10, errno.EPERM)


def test_error_names_the_operation_and_errno():
    key = nl.element_key(ipaddress.ip_address("192.0.2.2"), "tcp", 22)
    ops = [nl.ElementOp("add", "allow4", (nl.Element(key, 1),)), nl.ElementOp("create", "allow4", (nl.Element(key, 1),))]
    o = nl.BatchOutcome.expect(10, 2)
    o.feed([(11, 0), (12, errno.EEXIST)])
    err = nl.outcome_error(o, "spa", ops)
    assert isinstance(err, FirewallError) and err.errno == errno.EEXIST
    assert "create element inet spa allow4" in str(err) and "File exists" in str(err) and "EEXIST" in str(err)
    whole = nl.BatchOutcome.expect(10, 2)
    whole.feed([(10, errno.EPERM)])
    assert "batch of 2" in str(nl.outcome_error(whole, "spa", ops))
    assert nl.outcome_error(nl.BatchOutcome(10, 0, set()), "spa", ops) is None


# -- the writer, on a fake socket -------------------------------------------------


class FakeSocket:
    """Answers each batch with ``answer(seqs)``: a list of datagrams; times out when they run out."""

    def __init__(self, answer):
        self.answer = answer
        self.sent: list[bytes] = []
        self.queue: list[bytes] = []
        self.closed = False

    def sendto(self, data, _addr):
        self.sent.append(bytes(data))
        seqs = [s for _t, _f, s, _p in iter_messages(data)]
        self.queue += self.answer(seqs)
        return len(data)

    def recv_into(self, buf):
        if not self.queue:
            raise socket.timeout("timed out")
        d = self.queue.pop(0)
        buf[: len(d)] = d
        return len(d)

    def gettimeout(self):
        return 1.0

    def close(self):
        self.closed = True


def _writer(answer) -> tuple[nl.SetElementWriter, FakeSocket]:
    fake = FakeSocket(answer)
    return nl.SetElementWriter("spa", sock=fake), fake  # type: ignore[arg-type]


_OPS = [
    nl.ElementOp("add", "allow4", (nl.Element(nl.element_key(ipaddress.ip_address("192.0.2.2"), "tcp", 22), 1000, "x"),)),
    nl.ElementOp("delete", "allow4", (nl.Element(nl.element_key(ipaddress.ip_address("192.0.2.2"), "tcp", 22)),)),
]


def test_writer_sends_one_batch_and_reads_every_ack():
    w, fake = _writer(lambda seqs: [_ack(s) for s in seqs[1:-1]])
    w.apply(_OPS)
    w.apply(_OPS)
    assert len(fake.sent) == 2
    first = [s for _t, _f, s, _p in iter_messages(fake.sent[0])]
    second = [s for _t, _f, s, _p in iter_messages(fake.sent[1])]
    assert second[0] > first[-1], "each batch gets fresh sequence numbers"


def test_writer_ignores_stale_replies_and_acks_in_one_datagram():
    w, _fake = _writer(lambda seqs: [_ack(seqs[0] - 1, errno.ENOENT), b"".join(_ack(s) for s in seqs[1:-1])])
    w.apply(_OPS)


def test_writer_raises_on_an_element_error():
    w, _fake = _writer(lambda seqs: [_ack(seqs[1]), _ack(seqs[2], errno.ENOENT)])
    with pytest.raises(nl.NetlinkError) as info:
        w.apply(_OPS)
    assert info.value.errno == errno.ENOENT and "delete element inet spa allow4" in str(info.value)


def test_writer_raises_when_replies_never_come_or_are_garbage():
    w, _fake = _writer(lambda seqs: [b"\xff" * 40])
    with pytest.raises(FirewallError, match="did not answer"):
        w.apply(_OPS)


def test_writer_with_nothing_to_do_sends_nothing_and_closed_writer_refuses():
    w, fake = _writer(lambda seqs: [])
    w.apply([])
    assert fake.sent == []
    w.close()
    assert fake.closed
    with pytest.raises(FirewallError, match="closed"):
        w.apply(_OPS)


@pytest.mark.parametrize("table", ["spa", "a-longer-table-name"])
@pytest.mark.parametrize("comment", [None, "ssh", "door%20with%20a%20much%20longer%20name"])
@pytest.mark.parametrize("ports", [[("tcp", 22)], [("tcp", 22), ("udp", 53), ("tcp", 65535)]])
@pytest.mark.parametrize("version", [4, 6])
def test_a_create_template_renders_build_batchs_bytes(table, comment, ports, version):
    import random

    rng = random.Random(f"{table}{comment}{ports}{version}")
    size = 4 if version == 4 else 16
    zero = ipaddress.ip_address(bytes(size))
    tails = [nl.element_key(zero, proto, port)[size:] for proto, port in ports]
    t = nl.CreateTemplate(table, f"allow{version}", size, tails, comment)
    for _ in range(50):
        address = ipaddress.ip_address(rng.randbytes(size))
        timeout = rng.choice([1, 1500, 2**32 + 7, 2**64 - 1, rng.randrange(1, 2**40)])
        seq = rng.randrange(1, 0x7FFF0000)
        elements = tuple(nl.Element(nl.element_key(address, proto, port), timeout, comment) for proto, port in ports)
        expected = nl.build_batch(table, [nl.ElementOp("create", f"allow{version}", elements)], seq)
        assert t.render(address.packed, timeout, seq) == expected


def test_a_create_template_refuses_an_address_of_the_wrong_size():
    t = nl.CreateTemplate("spa", "allow4", 4, [b"\x06\0\0\0\0\x16\0\0"], "ssh")
    with pytest.raises(ValueError, match="16-byte address"):
        t.render(bytes(16), 1000, 1)
    with pytest.raises(ValueError):
        nl.CreateTemplate("spa", "allow4", 4, [], "ssh")
