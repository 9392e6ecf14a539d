"""lowbit."""
