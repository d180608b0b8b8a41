"""Real local HTTP servers that stand in for external services in tests."""
