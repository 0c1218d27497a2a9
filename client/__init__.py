"""knock-client: static knocks, rotating knocks and signed single packets."""
