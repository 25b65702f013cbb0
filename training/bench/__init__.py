"""Tools that measure training choices (never part of the product)."""
