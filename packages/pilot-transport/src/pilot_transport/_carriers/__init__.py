"""Carriers: move bytes between hosts, know nothing of trust (see ``_carrier``)."""
