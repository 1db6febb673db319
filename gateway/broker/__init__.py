"""The embedded MQTT broker: amqtt behind authentication, ACLs, persistent sessions and a packet firewall."""
