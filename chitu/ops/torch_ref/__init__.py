"""Plain-torch reference implementations: obviously right, run anywhere."""
