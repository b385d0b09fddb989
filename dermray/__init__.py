"""dermray."""
