"""elevgw: the access gateway for networked elevator display devices."""

__version__ = "0.1.0"
