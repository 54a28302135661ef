One retry helper (ipa_twisted/retry.py, on Twisted's backoffPolicy) behind lookup, the advertise address, inspection posting, the DHCP wait, image downloads and tgtd's start-up: one log line per failed attempt, with the same waits as before.
mDNS ipa_* overrides are coerced and checked like every other configuration value (AgentConfig.merged).
The set-up installs qemu-block-extra, so the iSCSI test reads the exported LUN back instead of skipping.
Start-up is a tree of services (ipa_twisted/startup/: configuration, hardware managers, clock, inspection, lookup, advertise, heartbeats, lockdown) composed in makeService; twistd ipa --help states its synopsis once.
