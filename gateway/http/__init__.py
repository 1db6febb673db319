"""The HTTP API and the offline dashboard: reads status, stored data and the catalog; never the composition root."""
