import os
import stat

from spa.grant import ActiveGrant, CommandAction, Grant
from spa.server.journal import Journal


def _g(door="ssh", addr="192.0.2.2", ports="22/tcp", deadline=1000.0, commands=None):
    g = Grant.create(door, addr, ports, 5, commands)
    return ActiveGrant(g.door, g.address, g.ports, deadline, commands)


def test_round_trip_and_update(tmp_path):
    j = Journal(tmp_path / "state")
    g = _g(commands=CommandAction(start="s %IP%", stop="t %IP%"))
    j.put(g, "command")
    e = j.get("ssh", g.address)
    assert e.grant == g and e.backend == "command" and not e.closing
    j.put(_g(deadline=2000.0, ports="22 443"), "nft")
    assert [x.grant.deadline for x in j.all()] == [2000.0]
    assert stat.S_IMODE(os.stat(j.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700


def test_survives_reopen(tmp_path):
    Journal(tmp_path).put(_g(addr="2001:db8::2"), "iptables")
    again = Journal(tmp_path)
    assert [str(e.grant.address) for e in again.all()] == ["2001:db8::2"]
    assert again._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert again._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_claim_close_once_and_respects_extension(tmp_path):
    j = Journal(tmp_path)
    a, b = Journal(tmp_path), Journal(tmp_path)  # two processes' views
    j.put(_g(deadline=100.0), "nft")
    assert not a.claim_close("ssh", "192.0.2.2", deadline=50.0)  # extended past "now": not due
    assert a.claim_close("ssh", "192.0.2.2", deadline=100.0)
    assert not b.claim_close("ssh", "192.0.2.2")  # only one closer
    assert j.get("ssh", "192.0.2.2").closing
    j.put(_g(deadline=300.0), "nft")  # granted again: no longer closing
    assert not j.get("ssh", "192.0.2.2").closing
    j.delete("ssh", "192.0.2.2")
    assert j.get("ssh", "192.0.2.2") is None
    j.delete("ssh", "192.0.2.2")  # idempotent


def test_get_many_finds_exactly_the_pairs_asked_for_in_chunks(tmp_path):
    j = Journal(tmp_path / "state")
    for i in range(900):
        j.put(_g(door="ssh" if i % 2 else "web", addr=f"198.51.{100 + i // 250}.{i % 250 + 1}"), "nft")
    keys = [(door, f"198.51.{100 + i // 250}.{i % 250 + 1}") for i in range(900) for door in ("ssh", "web")]
    got = j.get_many([(d, Grant.create(d, a, "22/tcp", 5).address) for d, a in keys])
    assert len(got) == 900  # each address holds one of the two doors, in more than one chunk of pairs
    for (door, addr), entry in got.items():
        assert (entry.grant.door, str(entry.grant.address)) == (door, addr)
        assert j.get(door, entry.grant.address) == entry
    assert j.get_many([]) == {} and j.get_many([("ssh", "203.0.113.1")]) == {}


def test_nonces_written_without_fsync_survive_the_process_and_leave_it_full(tmp_path):
    j = Journal(tmp_path)
    j.remember([(b"n" * 24, 2000.0)], durable=False)
    assert j._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again for the grants
    # A second connection (the next process) reads it from the write-ahead log.
    assert Journal(tmp_path).replay_entries(1000.0) == [(b"n" * 24, 2000.0)]


def test_session_says_when_nonces_may_be_lost(tmp_path):
    assert not Journal(tmp_path).begin_session()  # first start: nothing before
    # Killed with the machine still up: a grant the capture loop opened in the last
    # moment may have had its nonce still on the way to the journal.
    assert Journal(tmp_path).begin_session()
    assert Journal(tmp_path).begin_session()  # killed again, or the machine went down
    j = Journal(tmp_path)
    assert j.begin_session()  # the previous run never stopped cleanly
    j.end_session()
    assert not Journal(tmp_path).begin_session()  # a clean stop flushed everything


def test_a_journal_from_before_sessions_needs_no_refusal(tmp_path):
    Journal(tmp_path).remember([(b"m" * 24, 2000.0)])
    assert not Journal(tmp_path).begin_session()
