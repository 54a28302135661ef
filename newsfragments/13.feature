One retry helper (ipa_twisted/retry.py, on Twisted's backoffPolicy) behind lookup, the advertise address, inspection posting, the DHCP wait, image downloads and tgtd's start-up: one log line per failed attempt, with the same waits as before.
Image downloads that ask not to verify the server (inject_files with verify_ca false) use one shared unverified client with a pool of its own (http.HTTPClients), not a new client per file.
mDNS ipa_* overrides are coerced and checked like every other configuration value (AgentConfig.merged).
The set-up installs qemu-block-extra, so the iSCSI test reads the exported LUN back instead of skipping.
