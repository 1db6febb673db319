"""iotgw gateway: the composition root (app) and its parts: broker, forward, http, config, ops, cli."""
