"""File-system schemas: records, metadata RPC."""
