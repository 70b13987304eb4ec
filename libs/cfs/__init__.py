"""ClaudeFS shared libraries: bus, clock, supervisor, client, CLI."""
