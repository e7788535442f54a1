"""Built-in decoding strategies, one module per strategy (registered through the `decodekit` entry points)."""
