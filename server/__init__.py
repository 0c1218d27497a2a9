"""The daemon's edges: capture, firewall backends, the grant journal and scheduler."""
