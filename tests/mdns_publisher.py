"""A real mDNS publisher for tests: zeroconf announcing an endpoint the way Ironic does.

``python -m tests.mdns_publisher --service baremetal --endpoint http://192.0.2.1:6385/bm
--interface 192.0.2.1 [--param ipa_debug=true ...]`` registers
``<service>._openstack._tcp.local.`` with Ironic's rules (ironic-lib's mdns module): the
endpoint's IP addresses as A/AAAA records of the instance name (no host name: the catalog
named an address), its port in the SRV record, and TXT properties ``path`` (unless the
path is empty), ``protocol`` (unless http on 80 or https on 443) and the given params. It
prints ``published`` and runs until SIGTERM or SIGINT, then unregisters.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import sys
import threading
from urllib.parse import urlsplit

from zeroconf import IPVersion, ServiceInfo, Zeroconf

SERVICE_TYPE = "_openstack._tcp.local."


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--service", default="baremetal")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--interface", action="append", default=[],
                        help="address of an interface to publish on (repeatable)")
    parser.add_argument("--param", action="append", default=[], help="key=value")
    parser.add_argument("--server", default=None, help="a host name for the SRV target")
    options = parser.parse_args()
    url = urlsplit(options.endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    assert url.hostname is not None
    properties = dict(param.split("=", 1) for param in options.param)
    if url.path not in ("", "/"):
        properties["path"] = url.path
    if not ((port == 80 and url.scheme == "http") or (port == 443 and url.scheme == "https")):
        properties["protocol"] = url.scheme
    address = ipaddress.ip_address(url.hostname)
    name = f"{options.service}.{SERVICE_TYPE}"
    info = ServiceInfo(SERVICE_TYPE, name, addresses=[address.packed], port=port,
                       properties=properties, server=options.server)
    interfaces = options.interface or None
    zc = Zeroconf(interfaces=interfaces, ip_version=IPVersion.All) if interfaces else \
        Zeroconf(ip_version=IPVersion.All)
    zc.register_service(info)
    print("published", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    zc.unregister_service(info)
    zc.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
