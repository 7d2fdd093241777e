"""llmarc's benchmarks: scripts that measure and print figures (not tests)."""
