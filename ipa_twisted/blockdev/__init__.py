"""Block devices, the ground floor of the disk side: disks and their partitions, the
O_DIRECT writer, mounts. Imports only the infrastructure (context, process, errors)."""
