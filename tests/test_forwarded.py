"""The client address behind reverse proxies: X-Forwarded-For counts only when a trusted proxy sent it."""
import ipaddress

import pytest

from core import settings as settings_module
from signaling.forwarded import address_block, client_address

PROXIES = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")]


def test_without_trusted_proxies_the_peer_is_the_client():
    assert client_address("10.0.0.2", ["203.0.113.9"], []) == "10.0.0.2"


def test_a_header_from_an_untrusted_peer_is_ignored():
    assert client_address("198.51.100.7", ["203.0.113.9"], PROXIES) == "198.51.100.7"


def test_a_trusted_proxy_names_the_client():
    assert client_address("10.0.0.2", ["203.0.113.9"], PROXIES) == "203.0.113.9"
    assert client_address("::1", ["2001:db8::5"], PROXIES) == "2001:db8::5"


def test_a_client_cannot_spoof_an_address_in_front_of_the_proxys_entry():
    # the client sent "X-Forwarded-For: 1.2.3.4"; our proxy appended the address it saw
    assert client_address("10.0.0.2", ["1.2.3.4, 198.51.100.7"], PROXIES) == "198.51.100.7"


def test_a_chain_of_trusted_proxies_is_walked_to_the_first_untrusted_hop():
    assert client_address("10.0.0.2", ["203.0.113.9, 10.1.1.1", "10.2.2.2"], PROXIES) == "203.0.113.9"


def test_a_malformed_entry_leaves_the_last_trusted_hop_as_the_client():
    assert client_address("10.0.0.2", ["203.0.113.9, not-an-ip"], PROXIES) == "10.0.0.2"
    assert client_address("10.0.0.2", [""], PROXIES) == "10.0.0.2"
    assert client_address("10.0.0.2", ["[2001:db8::1]:443"], PROXIES) == "2001:db8::1"


def test_trusted_proxies_setting_is_validated():
    loaded = settings_module.load(env={"CLASSMOOD_SERVER_TRUSTED_PROXIES": "127.0.0.1, 172.16.0.0/12"})
    assert [str(n) for n in loaded.trusted_proxy_networks()] == ["127.0.0.1/32", "172.16.0.0/12"]
    with pytest.raises(ValueError, match="trusted_proxies.*'proxy.local'"):
        settings_module.load(env={"CLASSMOOD_SERVER_TRUSTED_PROXIES": "127.0.0.1,proxy.local"})


def test_limits_count_an_ipv6_client_by_its_64_block():
    assert address_block("2001:db8:1:2::5") == address_block("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert address_block("2001:db8:1:3::5") != address_block("2001:db8:1:2::5")
    assert address_block("203.0.113.5") == "203.0.113.5" != address_block("203.0.113.6")
    assert address_block("::ffff:203.0.113.5") == "203.0.113.5"
    assert address_block("not-an-ip") == "not-an-ip" and address_block(None) == ""
