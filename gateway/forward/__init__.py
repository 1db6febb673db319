"""Forwarding to the central event backbone: a durable outbox per destination, and destinations
(MQTT, NATS JetStream, Kafka) registered by type name."""
