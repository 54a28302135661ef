# The twistd dropin: names our service maker by module path and imports nothing of ours, so
# `twistd --help` stays fast.
from twisted.application.service import ServiceMaker

ipa = ServiceMaker(
    "ipa-twisted", "ipa_twisted.tap", "Ironic bare-metal provisioning agent.", "ipa"
)
