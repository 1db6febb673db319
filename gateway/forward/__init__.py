"""Forwarding to the central event backbone: a durable outbox per destination, and destinations
(MQTT, NATS JetStream, Kafka, InfluxDB, RabbitMQ, Redis Streams), one package each with its settings,
registered by type name."""
