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
