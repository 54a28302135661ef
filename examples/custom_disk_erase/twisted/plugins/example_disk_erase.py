# The dropin that makes the agent find the example manager.
from custom_disk_erase_manager import ExampleDiskEraseHardwareManager

example_disk_erase = ExampleDiskEraseHardwareManager()
