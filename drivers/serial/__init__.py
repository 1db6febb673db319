"""Serial-port drivers and their frame parsers."""
