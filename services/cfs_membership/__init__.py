"""membership: SWIM failure detection with Lifeguard over UDP, node liveness (DESIGN.md §6)."""
