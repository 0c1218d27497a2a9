"""Backend construction for namespace tests: one place that names the variants under test."""

from spa.server.firewall.iptables import IptablesBackend
from spa.server.firewall.nft import NftBackend

# The native backends as the tests name them; each must work behind the
# seed's iptables INPUT DROP (iptables-nft).
NATIVE = ("nft", "iptables")


def native_backend(name: str):
    if name == "nft":
        return NftBackend()
    if name == "iptables":
        return IptablesBackend(variant="nft")
    if name == "iptables-legacy":
        return IptablesBackend(variant="legacy")
    raise ValueError(name)
