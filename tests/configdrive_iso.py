"""Config drive images for tests: an ISO 9660 like Ironic's (``genisoimage -J -r``).

``make_iso(files)`` builds one with pycdlib (a test dependency): Joliet and Rock Ridge
names, plain ISO 9660 names that say nothing (``D1``, ``F2``), so a reader must use the
long names as a guest does. ``files`` maps ``/``-separated paths to contents.
"""

from __future__ import annotations

import io

META_DATA = {
    "openstack/latest/meta_data.json": b'{"uuid": "1be26c0b", "hostname": "node-1"}\n',
    "openstack/latest/network_data.json": b'{"links": [], "networks": []}\n',
    "openstack/latest/user_data": b"#cloud-config\n" + b"# padding\n" * 1000,
    "openstack/latest/vendor_data2.json": b"{}",
    "openstack/2012-08-10/meta_data.json": b'{"uuid": "1be26c0b"}\n',
    "openstack/content/0000": b"",
    "ec2/2009-04-04/meta-data.json": b'{"instance-id": "i-1"}',
}
"""What a config drive holds (names as cloud-init looks them up)."""


def make_iso(files: dict[str, bytes], label: str = "config-2") -> bytes:
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=label)
    names: dict[str, str] = {"": ""}
    count = 0

    def add_dir(path: str) -> str:
        nonlocal count
        if path in names:
            return names[path]
        parent, _, name = path.rpartition("/")
        parent_iso = add_dir(parent)
        count += 1
        names[path] = f"{parent_iso}/D{count}"
        iso.add_directory(names[path], rr_name=name, joliet_path="/" + path)
        return names[path]

    for path, content in sorted(files.items()):
        parent, _, name = path.rpartition("/")
        parent_iso = add_dir(parent)
        count += 1
        iso.add_fp(io.BytesIO(content), len(content), f"{parent_iso}/F{count}.;1",
                   rr_name=name, joliet_path="/" + path)
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()
