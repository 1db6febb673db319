"""iotgw pipeline: collect -> clean -> define -> store -> analyze."""
