from spa.metrics import Metric, parse, render


def test_render_and_parse_round_trip():
    text = render([
        Metric("spa_packets_total", "counter", "Packets by result.", {(("result", "knock"),): 5, (("result", "malformed"),): 1}),
        Metric("spa_grants_active", "gauge", "Grants open now.", {(): 2}),
        Metric("spa_interface_up", "gauge", "Capture state.", {(("interface", 'we"ird'),): 1}),
    ])
    assert "# TYPE spa_packets_total counter" in text
    assert 'spa_packets_total{result="knock"} 5' in text
    assert 'spa_interface_up{interface="we\\"ird"} 1' in text
    assert parse(text)["spa_grants_active"] == 2.0
    assert parse(text)['spa_packets_total{result="malformed"}'] == 1.0


def test_throttle_passes_a_burst_then_the_rate_and_counts_the_rest():
    from spa.server.logs import Throttle

    t = Throttle(rate=10, burst=5)
    assert sum(t.allow(100.0) for _ in range(20)) == 5
    assert t.take_suppressed() == 15 and t.take_suppressed() == 0
    assert sum(t.allow(100.0 + i * 0.01) for i in range(1, 101)) == 10  # one second at 10/s


def test_throttle_decides_as_a_plain_token_bucket_and_next_ok_never_hides_a_token():
    import random

    from spa.server.logs import Throttle

    rng = random.Random(5)
    for _ in range(50):
        rate, burst = rng.choice([(10, 5), (100, 500), (1, 1)])
        t = Throttle(rate=rate, burst=burst)
        tokens, last, now = float(burst), None, 0.0
        for _ in range(500):
            now += rng.choice([0.0, 0.0, 1e-4, 0.003, 0.05, 0.5])
            if last is not None:
                tokens = min(burst, tokens + (now - last) * rate)
            last = now
            expected = tokens >= 1.0
            if expected:
                tokens -= 1.0
            # What the capture loop does: skip the call while now < next_ok.
            got = False if now < t.next_ok else t.allow(now)
            assert got == expected
