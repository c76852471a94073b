"""The head-end: issues reads, opens and verifies what meters send back, and
stores readings in SQLite."""
