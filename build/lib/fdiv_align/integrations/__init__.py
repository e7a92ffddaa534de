"""Integrations with other trainers (optional extras)."""
