"""Hardware inspection: collectors, the data they build, and posting it to the receiver.

- ``collectors``: ``AccumulatedFailures`` and the collectors named by
  ``inspection_collectors`` (default, logs, pci-devices, extra-hardware, dmi-decode,
  numa-topology, lldp);
- ``inspect.inspect(context, managers, config, http)``: one run, collect then post;
- ``post``: the POST with the spec's backoff, for ironic-inspector's ``/v1/continue`` and
  Ironic's ``/v1/continue_inspection``;
- ``dhcp.wait_for_dhcp``; ``cli``: the ``ironic-collect-introspection-data`` command.

See docs/inspection.md.
"""
