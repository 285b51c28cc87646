"""The API server's syntax rules for the fields kproxy reads, and kube-proxy's sloppy IP parsing.

Pure and standard-library only. The manifests source has no API server in front of it, so a
manifest can hold what no cluster would: a 10,000-character name, a label value with spaces.
`kproxy.kube.convert` checks every object with these functions (for both sources: the API watch
and the manifests directory) and skips what the API server would refuse, so nothing it would
refuse ever reaches the renderers.

Each check returns an error text in the API server's words ("must be no more than 63
characters", ...) or "" when the value is valid. Rules follow k8s.io/apimachinery's
`validation` package (IsDNS1123Label, IsDNS1123Subdomain, IsDNS1035Label, IsQualifiedName,
IsValidLabelValue, IsValidPortName) and k8s.io/utils/net's ParseIPSloppy/ParseCIDRSloppy:
IPv4 parts are decimal with leading zeros ignored ("172.30.0.041" is 172.30.0.41, not octal),
the way Go's net.ParseIP read them before Go 1.17 and the way kube-proxy still reads them,
because the API server stored such addresses for years and old objects still hold them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any

DNS1123_LABEL_MAX = 63
DNS1123_SUBDOMAIN_MAX = 253
DNS1035_LABEL_MAX = 63
LABEL_VALUE_MAX = 63
QUALIFIED_NAME_MAX = 63
PORT_NAME_MAX = 15
ANNOTATIONS_MAX_BYTES = 256 * 1024  # TotalAnnotationSizeLimitB

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_PORT_NAME_CHARS = re.compile(r"[-a-z0-9]+")
_SLOPPY_V4 = re.compile(r"([0-9]+)\.([0-9]+)\.([0-9]+)\.([0-9]+)")


def _too_long(value: str, limit: int) -> str:
    return (
        f"must be no more than {limit} characters (is {len(value)})" if len(value) > limit else ""
    )


def dns1123_label(value: str) -> str:
    """A DNS-1123 label: namespaces, service port names, endpoint hostnames."""
    if err := _too_long(value, DNS1123_LABEL_MAX):
        return err
    if not _DNS1123_LABEL.fullmatch(value):
        return (
            "must be a lowercase RFC 1123 label (lower case alphanumerics and '-', "
            "starting and ending with an alphanumeric)"
        )
    return ""


def dns1123_subdomain(value: str) -> str:
    """A DNS-1123 subdomain: EndpointSlice and Node names, ExternalName targets."""
    if err := _too_long(value, DNS1123_SUBDOMAIN_MAX):
        return err
    if not _DNS1123_SUBDOMAIN.fullmatch(value):
        return (
            "must be a lowercase RFC 1123 subdomain (lower case alphanumerics, '-' and '.', "
            "starting and ending with an alphanumeric)"
        )
    return ""


def dns1035_label(value: str) -> str:
    """A DNS-1035 label: Service names (they become DNS labels and env variable names)."""
    if err := _too_long(value, DNS1035_LABEL_MAX):
        return err
    if not _DNS1035_LABEL.fullmatch(value):
        return (
            "must be an RFC 1035 label (lower case alphanumerics and '-', starting with a "
            "letter and ending with an alphanumeric)"
        )
    return ""


def qualified_name(value: str) -> str:
    """A label or annotation key: an optional DNS-1123 subdomain prefix and '/', then a name."""
    prefix, slash, name = value.rpartition("/")
    if slash:
        if not prefix:
            return "prefix part must be non-empty"
        if err := dns1123_subdomain(prefix):
            return f"prefix part {err}"
    if not name:
        return "name part must be non-empty"
    if err := _too_long(name, QUALIFIED_NAME_MAX):
        return f"name part {err}"
    if not _QUALIFIED_NAME.fullmatch(name):
        return (
            "name part must consist of alphanumerics, '-', '_' or '.', starting and ending "
            "with an alphanumeric"
        )
    return ""


def label_value(value: str) -> str:
    if err := _too_long(value, LABEL_VALUE_MAX):
        return err
    if value and not _QUALIFIED_NAME.fullmatch(value):
        return (
            "must be empty or consist of alphanumerics, '-', '_' or '.', starting and ending "
            "with an alphanumeric"
        )
    return ""


def port_name(value: str) -> str:
    """IsValidPortName (IANA_SVC_NAME): a container port name a targetPort may refer to."""
    if err := _too_long(value, PORT_NAME_MAX):
        return err
    if not _PORT_NAME_CHARS.fullmatch(value):
        return "must contain only lower case alphanumerics and '-'"
    if not any(c.isalpha() for c in value):
        return "must contain at least one letter"
    if "--" in value:
        return "must not contain consecutive hyphens"
    if value.startswith("-") or value.endswith("-"):
        return "must not begin or end with a hyphen"
    return ""


def labels_error(labels: Mapping[Any, Any]) -> str:
    """The first invalid label (key or value) of a metadata.labels map, or ""."""
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str):
            return f"label {str(key)[:80]!r} must map a string to a string"
        if err := qualified_name(key):
            return f"label key {key[:80]!r}: {err}"
        if err := label_value(value):
            return f"label {key[:80]!r} value {value[:80]!r}: {err}"
    return ""


def annotations_error(annotations: Mapping[Any, Any]) -> str:
    total = 0
    for key, value in annotations.items():
        if not isinstance(key, str) or not isinstance(value, str):
            return f"annotation {str(key)[:80]!r} must map a string to a string"
        if err := qualified_name(key):
            return f"annotation key {key[:80]!r}: {err}"
        total += len(key) + len(value)
    if total > ANNOTATIONS_MAX_BYTES:
        return f"annotations are {total} bytes, more than {ANNOTATIONS_MAX_BYTES}"
    return ""


# -- addresses -------------------------------------------------------------------------------
def parse_ip_sloppy(text: str) -> tuple[str, bool]:
    """(canonical text, read sloppily) of an IP address; ValueError if it is not one.

    As k8s.io/utils/net.ParseIPSloppy: IPv4 parts (also the dotted tail of an IPv6 address)
    may carry leading zeros, read as decimal. Zones ("fe80::1%eth0") are not addresses.
    """
    if "%" in text:
        raise ValueError(f"{text!r} has a zone")
    try:
        return str(ipaddress.ip_address(text)), False
    except ValueError:
        pass
    head, colon, tail = text.rpartition(":")
    m = _SLOPPY_V4.fullmatch(tail)
    if m is None:
        raise ValueError(f"{text!r} is not an IP address")
    parts = [int(p) for p in m.groups()]
    if any(p > 255 for p in parts):
        raise ValueError(f"{text!r} is not an IP address")
    v4 = ".".join(map(str, parts))
    return str(ipaddress.ip_address(f"{head}{colon}{v4}" if colon else v4)), True


def parse_cidr_sloppy(text: str) -> tuple[str, bool]:
    """(canonical network, read sloppily) of a CIDR, as ParseCIDRSloppy: the address part may
    have leading zeros; host bits are masked off (kube-proxy uses the network)."""
    addr, slash, prefix = text.partition("/")
    if not slash or not prefix.isascii() or not prefix.isdigit():
        raise ValueError(f"{text!r} is not a CIDR")
    ip, sloppy = parse_ip_sloppy(addr)
    return str(ipaddress.ip_network(f"{ip}/{int(prefix)}", strict=False)), sloppy


def special_ip(canonical: str) -> str:
    """ValidateNonSpecialIP: why an address may not be an external IP or an endpoint, or ""."""
    ip = ipaddress.ip_address(canonical)
    if ip.is_unspecified:
        return "may not be unspecified (0.0.0.0 or ::)"
    if ip.is_loopback:
        return "may not be in the loopback range (127.0.0.0/8, ::1/128)"
    if ip.is_link_local:
        return "may not be in the link-local range (169.254.0.0/16, fe80::/10)"
    packed = ip.packed
    if (
        packed[:3] == b"\xe0\x00\x00"
        if ip.version == 4
        else (packed[0], packed[1] & 15) == (255, 2)
    ):
        return "may not be in the link-local multicast range (224.0.0.0/24, ff02::/16)"
    return ""


def short(name: str, limit: int = 80) -> str:
    """A name for a log line: long names are cut, with their length said."""
    if len(name) <= limit:
        return name
    return f"{name[:limit]}...({len(name)} chars)"
