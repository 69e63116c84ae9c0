"""Seeded, realistic generators for the three input topics, their scenarios and the producer."""
