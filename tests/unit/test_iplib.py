"""Unit tests for nlbfarm.node.iplib: pure helpers, no root, no kernel state."""
import errno
import ipaddress
import threading

import pytest
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError

from nlbfarm.errors import NetError, NotFound
from nlbfarm.node import iplib
# private helpers are tested where they live
from nlbfarm.node.iplib.errors import _translated
from nlbfarm.node.iplib.maddr import _ifreq_hwaddr, _read_dev_mcast
from nlbfarm.node.iplib.sysctl import _sysctl_path


# ---------------------------------------------------------------- ifnames

@pytest.mark.parametrize("name", ["eth0", "a", "br-farm", "vb0.100", "x" * 15, "n1_eth0"])
def test_valid_ifnames(name):
    assert iplib.validate_ifname(name) == name


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("", "must not be empty"),
        ("x" * 16, "at most 15"),
        (".", "reserved"),
        ("..", "reserved"),
        ("eth 0", "contains characters"),
        ("eth0:1", "contains characters"),
        ("a/b", "contains characters"),
        ("veth@if3", "contains characters"),
        ("ethé", "contains characters"),
        (None, "must be a string"),
    ],
)
def test_invalid_ifnames(name, fragment):
    with pytest.raises(ValueError, match=fragment):
        iplib.validate_ifname(name)


def test_ifname_error_names_the_value_and_length():
    with pytest.raises(ValueError) as info:
        iplib.validate_ifname("averyverylongname")
    assert "'averyverylongname'" in str(info.value)
    assert "17 characters" in str(info.value)


@pytest.mark.parametrize("name", ["ns1", "iplt-1a2b3c", "lab_node.1", "A" * 64])
def test_valid_netns_names(name):
    assert iplib.validate_netns_name(name) == name


@pytest.mark.parametrize("name", ["", ".hidden", "-x", "a/b", "..", "a b", "A" * 65, None])
def test_invalid_netns_names(name):
    with pytest.raises(ValueError, match="namespace name"):
        iplib.validate_netns_name(name)


# ---------------------------------------------------------------- CIDRs

@pytest.mark.parametrize(
    "text, expected",
    [
        ("198.18.0.10/24", "198.18.0.10/24"),
        (" 198.18.0.10/32 ", "198.18.0.10/32"),
        ("198.18.0.0/24", "198.18.0.0/24"),
        ("2001:DB8:0:0::10/64", "2001:db8::10/64"),
        ("fe80::1/64", "fe80::1/64"),
        ("198.18.0.10/255.255.255.0", "198.18.0.10/24"),
    ],
)
def test_normalize_cidr(text, expected):
    assert iplib.normalize_cidr(text) == expected


def test_parse_cidr_types():
    assert isinstance(iplib.parse_cidr("10.0.0.1/8"), ipaddress.IPv4Interface)
    assert isinstance(iplib.parse_cidr("2001:db8::1/64"), ipaddress.IPv6Interface)
    iface = ipaddress.ip_interface("10.0.0.1/8")
    assert iplib.parse_cidr(iface) is iface


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("198.18.0.10", "no prefix length.*198.18.0.10/32"),
        ("2001:db8::1", "no prefix length.*2001:db8::1/128"),
        ("198.18.0.10/33", "not a valid IPv4/IPv6 CIDR"),
        ("198.18.0.300/24", "not a valid"),
        ("2001:db8::1/129", "not a valid"),
        ("host/24", "not a valid"),
        (42, "must be a string"),
    ],
)
def test_parse_cidr_rejects(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        iplib.parse_cidr(text)


# ---------------------------------------------------------------- MACs

@pytest.mark.parametrize(
    "text",
    ["03:bf:c6:12:00:0a", "03:BF:C6:12:00:0A", "03-bf-c6-12-00-0a", "03bfc612000a",
     b"\x03\xbf\xc6\x12\x00\x0a"],
)
def test_normalize_mac(text):
    assert iplib.normalize_mac(text) == "03:bf:c6:12:00:0a"


@pytest.mark.parametrize(
    "text", ["03:bf:c6:12:00", "03:bf:c6:12:00:0g", "03:bf-c6:12:00:0a", "3:bf:c6:12:0:a", "", 5]
)
def test_normalize_mac_rejects(text):
    with pytest.raises(ValueError, match="MAC address"):
        iplib.normalize_mac(text)


# ---------------------------------------------------------------- sysctl keys

@pytest.mark.parametrize(
    "key, path",
    [
        ("net.ipv4.ip_forward", "/proc/sys/net/ipv4/ip_forward"),
        ("net.ipv4.conf.all.arp_announce", "/proc/sys/net/ipv4/conf/all/arp_announce"),
        ("net/ipv4/conf/eth0.100/arp_ignore", "/proc/sys/net/ipv4/conf/eth0.100/arp_ignore"),
    ],
)
def test_sysctl_path(key, path):
    assert _sysctl_path(key) == path


@pytest.mark.parametrize(
    "key, fragment",
    [
        ("kernel.hostname", "not under net"),
        ("vm.swappiness", "not under net"),
        ("net..ipv4", "invalid component"),
        ("net/ipv4/../../kernel/hostname", "invalid component"),
        ("net.ipv4.conf.a b.x", "invalid component"),
        ("", "non-empty"),
    ],
)
def test_sysctl_path_rejects(key, fragment):
    with pytest.raises(ValueError, match=fragment):
        _sysctl_path(key)


# ---------------------------------------------------------------- GARP frame

def test_build_garp_frame_exact_bytes():
    frame = iplib.build_garp_frame("02:00:00:aa:bb:cc", "03:bf:c6:12:63:64", "198.18.99.100")
    expected = bytes.fromhex(
        # Ethernet: dst broadcast, src = interface MAC, type ARP
        "ffffffffffff" "020000aabbcc" "0806"
        # ARP: htype 1, ptype IPv4, hlen 6, plen 4, op 1 (request)
        "0001" "0800" "06" "04" "0001"
        # sender hw = cluster MAC, sender ip = VIP
        "03bfc6126364" "c6126364"
        # target hw = zero, target ip = VIP
        "000000000000" "c6126364"
    ) + b"\x00" * 18  # padding to ETH_ZLEN
    assert frame == expected
    assert len(frame) == 60


def test_build_garp_frame_accepts_bytes_and_cidr():
    a = iplib.build_garp_frame(b"\x02\x00\x00\xaa\xbb\xcc", "03-BF-C6-12-63-64", "198.18.99.100/24")
    b = iplib.build_garp_frame("02:00:00:aa:bb:cc", "03:bf:c6:12:63:64",
                               ipaddress.ip_address("198.18.99.100"))
    assert a == b


@pytest.mark.parametrize(
    "ip, fragment", [("2001:db8::1", "IPv4 only"), ("198.18.99.300", "not an IP address")]
)
def test_build_garp_frame_rejects_bad_ip(ip, fragment):
    with pytest.raises(ValueError, match=fragment):
        iplib.build_garp_frame("02:00:00:aa:bb:cc", "03:bf:c6:12:63:64", ip)


def test_build_garp_frame_rejects_bad_mac():
    with pytest.raises(ValueError, match="MAC address"):
        iplib.build_garp_frame("02:00:00:aa:bb", "03:bf:c6:12:63:64", "198.18.99.1")


def test_send_gratuitous_arp_validates_before_touching_anything():
    with pytest.raises(ValueError, match="count"):
        iplib.send_gratuitous_arp("eth0", "198.18.99.1", "03:bf:c6:12:63:64", "iplt-x", count=0)
    with pytest.raises(ValueError, match="IPv4 only"):
        iplib.send_gratuitous_arp("eth0", "2001:db8::1", "03:bf:c6:12:63:64", "iplt-x")


# ---------------------------------------------------------------- unsolicited NA frame

NA_ARGS = ("02:00:00:aa:bb:cc", "03:bf:00:00:00:64", "2001:db8::100")
VIP6 = bytes.fromhex("20010db8000000000000000000000100")
ALL_NODES = bytes.fromhex("ff020000000000000000000000000001")


def test_build_unsolicited_na_frame_fields():
    frame = iplib.build_unsolicited_na_frame(*NA_ARGS)
    assert len(frame) == 14 + 40 + 32
    # Ethernet: dst all-nodes multicast, src = interface MAC, type IPv6
    assert frame[:14] == bytes.fromhex("333300000001" "020000aabbcc" "86dd")
    ip6, icmp = frame[14:54], frame[54:]
    # version 6, tclass 0, flow 0; payload 32; next header ICMPv6; hop limit 255
    assert ip6[:8] == bytes.fromhex("60000000" "0020" "3a" "ff")
    assert ip6[8:24] == VIP6 and ip6[24:40] == ALL_NODES
    assert icmp[:2] == bytes.fromhex("8800")  # type 136, code 0
    assert icmp[4:8] == bytes.fromhex("20000000")  # R=0 S=0 O=1
    assert icmp[8:24] == VIP6  # target
    assert icmp[24:] == bytes.fromhex("02" "01" "03bf00000064")  # target lladdr option


def test_build_unsolicited_na_frame_checksum_verifies():
    frame = iplib.build_unsolicited_na_frame(*NA_ARGS)
    icmp = frame[54:]
    pseudo = VIP6 + ALL_NODES + len(icmp).to_bytes(4, "big") + b"\x00\x00\x00\x3a"
    data = pseudo + icmp
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert total == 0xFFFF
    assert icmp[2:4] != b"\x00\x00"
    # a different target gives a different checksum (it is not a constant)
    other = iplib.build_unsolicited_na_frame(NA_ARGS[0], NA_ARGS[1], "2001:db8::101")
    assert other[56:58] != icmp[2:4]


def test_build_unsolicited_na_frame_accepts_bytes_and_cidr():
    a = iplib.build_unsolicited_na_frame(b"\x02\x00\x00\xaa\xbb\xcc", "03-BF-00-00-00-64",
                                         "2001:DB8::100/64")
    b = iplib.build_unsolicited_na_frame("02:00:00:aa:bb:cc", "03:bf:00:00:00:64",
                                         ipaddress.ip_address("2001:db8::100"))
    assert a == b == iplib.build_unsolicited_na_frame(*NA_ARGS)


@pytest.mark.parametrize(
    "ip, fragment", [("198.18.99.1", "IPv6 only"), ("2001:db8::g", "not an IP address")]
)
def test_build_unsolicited_na_frame_rejects_bad_ip(ip, fragment):
    with pytest.raises(ValueError, match=fragment):
        iplib.build_unsolicited_na_frame("02:00:00:aa:bb:cc", "03:bf:00:00:00:64", ip)


def test_send_unsolicited_na_validates_before_touching_anything():
    with pytest.raises(ValueError, match="count"):
        iplib.send_unsolicited_na("eth0", "2001:db8::1", "03:bf:00:00:00:64", "iplt-x", count=0)
    with pytest.raises(ValueError, match="interval"):
        iplib.send_unsolicited_na("eth0", "2001:db8::1", "03:bf:00:00:00:64", "iplt-x",
                                  interval=-1)
    with pytest.raises(ValueError, match="IPv6 only"):
        iplib.send_unsolicited_na("eth0", "198.18.99.1", "03:bf:00:00:00:64", "iplt-x")
    with pytest.raises(ValueError, match="MAC address"):
        iplib.send_unsolicited_na("eth0", "2001:db8::1", "03:bf:00", "iplt-x")


def test_multicast_mac_must_be_multicast():
    with pytest.raises(ValueError, match="not a multicast MAC"):
        iplib.add_multicast_mac("eth0", "02:bf:c6:12:63:64", "iplt-x")


# ---------------------------------------------------------------- errno mapping

def test_enoent_and_enodev_map_to_not_found():
    for code in (errno.ENOENT, errno.ENODEV):
        exc = iplib.map_netlink_error(NetlinkError(code), "set link up", "'eth9' in netns 'a'")
        assert isinstance(exc, NotFound)
        assert "set link up 'eth9' in netns 'a'" in str(exc)
        assert errno.errorcode[code] in str(exc)


def test_eperm_maps_to_net_error_with_capability_hint():
    exc = iplib.map_netlink_error(NetlinkError(errno.EPERM), "add address", "10.0.0.1/24 to 'eth0'")
    assert type(exc) is NetError
    assert "Operation not permitted (EPERM)" in str(exc)
    assert "CAP_NET_ADMIN" in str(exc)


def test_other_errors_name_operation_object_and_errno():
    exc = iplib.map_netlink_error(NetlinkError(errno.EBUSY), "delete link", "'br0' in netns 'n1'")
    assert type(exc) is NetError
    assert str(exc) == "delete link 'br0' in netns 'n1': Device or resource busy (EBUSY)"


def test_eexist_is_an_error_when_it_reaches_the_mapper():
    exc = iplib.map_netlink_error(NetlinkError(errno.EEXIST), "create veth", "'a'")
    assert type(exc) is NetError and "EEXIST" in str(exc)


def test_dump_interrupted_maps_to_net_error():
    exc = iplib.map_netlink_error(NetlinkDumpInterrupted(), "list addresses of", "'eth0'")
    assert type(exc) is NetError and "retry" in str(exc)


def test_os_error_mapping():
    assert isinstance(iplib.map_os_error(OSError(errno.ENODEV, "x"), "op", "t"), NotFound)
    exc = iplib.map_os_error(OSError(errno.EACCES, "x"), "op", "t", hint="needs magic")
    assert type(exc) is NetError and "needs magic" in str(exc)
    exc = iplib.map_os_error(TimeoutError("child did not answer"), "create", "netns 'a'")
    assert type(exc) is NetError and "child did not answer" in str(exc)


def test_translated_never_leaks_netlink_error():
    with pytest.raises(NotFound) as info:
        with _translated("op", "obj"):
            raise NetlinkError(errno.ENODEV)
    assert isinstance(info.value.__cause__, NetlinkError)
    with pytest.raises(NetError):
        with _translated("op", "obj"):
            raise NetlinkError(errno.EINVAL)
    with pytest.raises(ValueError):  # programming errors pass through
        with _translated("op", "obj"):
            raise ValueError("bad")


# ---------------------------------------------------------------- namespace plumbing

def test_run_in_netns_none_runs_inline():
    assert iplib.run_in_netns(None, threading.get_ident) == threading.get_ident()


def test_missing_namespace_is_not_found_without_root():
    with pytest.raises(NotFound, match="iplt-does-not-exist"):
        iplib.run_in_netns("iplt-does-not-exist", lambda: None)
    with pytest.raises(NotFound):
        with iplib.ip_for("iplt-does-not-exist"):
            pass


def test_dev_mcast_parsing(monkeypatch, tmp_path):
    sample = (
        "2    br0             1     0     333300000001\n"
        "2    br0             1     1     03bfc6126364\n"
        "3    vb0             1     0     01005e000001\n"
    )
    path = tmp_path / "dev_mcast"
    path.write_text(sample)
    real_open = open

    def fake_open(name, *a, **kw):
        if name == "/proc/thread-self/net/dev_mcast":
            return real_open(path, *a, **kw)
        return real_open(name, *a, **kw)

    monkeypatch.setattr("builtins.open", fake_open)
    assert _read_dev_mcast("br0") == [("33:33:00:00:00:01", False), ("03:bf:c6:12:63:64", True)]
    assert _read_dev_mcast("vb0") == [("01:00:5e:00:00:01", False)]
    assert _read_dev_mcast("nope") == []


def test_ifreq_layout():
    req = _ifreq_hwaddr("br0", bytes.fromhex("03bfc6126364"))
    assert len(req) == 32
    assert req[:16] == b"br0" + b"\x00" * 13
    assert req[16:18] == b"\x00\x00"  # AF_UNSPEC, as the kernel requires
    assert req[18:24] == bytes.fromhex("03bfc6126364")


def test_ip_for_refuses_a_thread_with_a_running_event_loop():
    import asyncio

    async def main():
        with pytest.raises(RuntimeError, match="asyncio.to_thread"):
            with iplib.ip_for(None):
                pass

    asyncio.run(main())
