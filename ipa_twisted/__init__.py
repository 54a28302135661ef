"""ipa-twisted: an Ironic bare-metal provisioning agent on Twisted."""

__version__ = "0.1.0"
