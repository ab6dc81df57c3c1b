"""The ``twistd elevgw`` plugin: names the module that holds Options and makeService.

Kept this small on purpose: ``twistd --help`` imports every plugin, so the gateway itself is
imported only when ``twistd elevgw`` actually runs.
"""

from twisted.application.service import ServiceMaker

elevgw = ServiceMaker(
    "elevgw",
    "elevgw.tap",
    "Access gateway for networked elevator display devices.",
    "elevgw",
)
