"""The generic hardware manager, as a Twisted plugin providing IHardwareManager.

The agent finds hardware managers with ``twisted.plugin.getPlugins(IHardwareManager)``: any
module-level object in a ``twisted/plugins/*.py`` dropin that provides both ``IPlugin`` and
``ipa_twisted.hardware.interface.IHardwareManager``. Instances of ``HardwareManager``
subclasses provide both already.

A third-party package adds a manager by shipping its own dropin, e.g.
``acme_ipa/twisted/plugins/acme_hardware.py`` (no ``__init__.py`` in ``twisted/`` or
``twisted/plugins/``, which must be listed in the package's data or packages)::

    from acme_ipa.manager import AcmeHardwareManager   # a HardwareManager subclass
    acme = AcmeHardwareManager()                        # takes no constructor arguments

The instance is shared by every lookup: the agent calls ``bind(context)`` on it and then
``evaluate_hardware_support()``; it must not do hardware work at import time. Managers
that do not subclass ``HardwareManager`` declare ``@implementer(IHardwareManager, IPlugin)``
themselves. Keep the dropin's imports light: twistd imports dropins when it rebuilds its
plugin cache.
"""

from ipa_twisted.hardware.container_manager import ContainerHardwareManager
from ipa_twisted.hardware.generic.manager import GenericHardwareManager
from ipa_twisted.hardware.vendors.intel_cna import IntelCnaHardwareManager
from ipa_twisted.hardware.vendors.mellanox import MellanoxDeviceHardwareManager

generic_hardware_manager = GenericHardwareManager()
mellanox_hardware_manager = MellanoxDeviceHardwareManager()
intel_cna_hardware_manager = IntelCnaHardwareManager()
container_hardware_manager = ContainerHardwareManager()
