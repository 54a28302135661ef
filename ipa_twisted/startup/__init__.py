"""Start-up as a tree of services (composed in ``ipa_twisted.tap.makeService``).

Each start-up stage is a child service handed the event it waits for, in the reference
agent's order::

    API listener        listens at once; commands that need the managers wait for them
    ConfigResolution    virtual media parameters, then mDNS           -> "config resolved"
    HardwareLoading     hardware_initialization_delay, udev settled, the managers
                                                                      -> "managers loaded"
    ClockSync           NTP, when ntp_server is set                   -> "clock set"
    InspectionService   where inspection_callback_url is set          -> "inspected"
    LookupService       unless standalone                             -> "node known"
    AdvertiseService    the address and API TLS Ironic is told        -> "advertised"
    Heartbeater         heartbeats from then on
    LockdownService     closes all of the above when ``system.lockdown`` asks
"""
