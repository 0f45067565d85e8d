"""A student's offer cannot make the bot probe addresses it must not contact."""
from bot.ice_filter import filter_candidates, is_loopback_host


def candidate(address: str, port: int = 50000) -> str:
    return f"a=candidate:1 1 udp 2130706431 {address} {port} typ host\r\n"


OFFER_HEAD = "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"


def test_lan_public_mdns_and_relay_candidates_are_kept():
    good = [candidate("192.168.1.20"), candidate("10.0.0.7"), candidate("203.0.113.9"),
            candidate("2001:db8::7"), candidate("0b6c1a2e-1f6d-4c1e-9f3e-0c1d2e3f4a5b.local"),
            "a=candidate:2 1 udp 41885439 198.51.100.4 3478 typ relay raddr 0.0.0.0 rport 0\r\n"]
    sdp = OFFER_HEAD + "".join(good) + "a=end-of-candidates\r\n"
    assert filter_candidates(sdp, allow_loopback=False) == (sdp, 0)


def test_loopback_link_local_multicast_and_dns_names_are_dropped():
    bad = [candidate("127.0.0.1", 5432), candidate("::1"), candidate("169.254.169.254", 80),
           candidate("fe80::1"), candidate("224.0.0.251"), candidate("255.255.255.255"), candidate("0.0.0.0"),
           candidate("::ffff:127.0.0.1"), candidate("metadata.google.internal"), "a=candidate:broken\r\n"]
    kept = candidate("192.168.1.20")
    sdp, dropped = filter_candidates(OFFER_HEAD + "".join(bad) + kept, allow_loopback=False)
    assert dropped == len(bad) and sdp == OFFER_HEAD + kept


def test_loopback_is_allowed_only_for_a_bot_on_a_loopback_server():
    sdp = OFFER_HEAD + candidate("127.0.0.1")
    assert filter_candidates(sdp, allow_loopback=True) == (sdp, 0)
    assert filter_candidates(sdp, allow_loopback=False)[1] == 1


def test_the_bot_knows_when_its_server_is_on_loopback():
    assert is_loopback_host("localhost") and is_loopback_host("127.0.0.1") and is_loopback_host("::1")
    assert not is_loopback_host("class.example.org") and not is_loopback_host("10.0.0.5")


def test_the_bot_declines_abs_send_time_so_no_bandwidth_feedback_is_sent():
    from bot.ice_filter import decline_extensions
    offer = ("v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"
             "a=extmap:1 urn:ietf:params:rtp-hdrext:sdes:mid\r\n"
             "a=extmap:3 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time\r\n"
             "a=rtpmap:96 VP8/90000\r\n")
    declined = decline_extensions(offer)
    assert "abs-send-time" not in declined
    assert "a=extmap:1 urn:ietf:params:rtp-hdrext:sdes:mid\r\n" in declined and declined.endswith("VP8/90000\r\n")
    assert decline_extensions("a=extmap:\r\n") == "a=extmap:\r\n"      # a malformed line is left to the SDP parser
