"""The network, its inferers, its export and weight hashing."""
