"""The generic hardware manager: ``manager`` (the steps and getters every Linux machine
has) and its collaborators, each given the context and the manager's disk listing:
``erase`` (the disk erase steps) and ``raid`` (software RAID)."""
