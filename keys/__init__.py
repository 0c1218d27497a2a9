"""Key files: generation, permissions, authorized_keys and known_servers."""
