"""iotgw device drivers: the sources of readings."""
