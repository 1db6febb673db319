"""Operations: systemd (notify, watchdog, unit install) and logging (journald priorities, JSON, redaction)."""
