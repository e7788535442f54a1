"""The reference zoo: tiny models trained here on synthetic data (issue 3)."""
