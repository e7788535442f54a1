"""Pipeline adapters, one module per pipeline family, and the reference zoo."""
