"""Observability: Prometheus metrics, logs (the access line included), request traces and their OpenTelemetry
export. Imports only the foundation (`service.settings`, `service.errors`)."""
