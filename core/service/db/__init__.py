"""Persistence: engine and sessions (``base``), tables (``tables``), migrations (``migrate``), and the data
functions by entity: ``tenants`` (and API keys), ``inputs`` (models, datasets), ``jobs`` (the API's side),
``attempts`` (the workers' side), ``outputs`` (events, metrics, artifacts); ``rows`` holds what they share."""
