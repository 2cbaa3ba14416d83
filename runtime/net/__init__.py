"""Parties on a network: mutual-TLS links, the party server and query client, configs, certificates."""
