"""iotgw gateway: the composition root (broker, service, CLI)."""
