"""Stand-ins for the real inference engines' executables (see README.md); harness.py helps tests launch them."""
