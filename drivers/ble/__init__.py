"""Bluetooth LE drivers and their advertisement decoders."""
