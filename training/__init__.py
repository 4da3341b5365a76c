"""Data preparation and training scripts of the embedded model (run them as scripts; see each file)."""
