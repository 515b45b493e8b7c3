"""Core types and filters, at upstream's paths (`wse_server.core.filters`, `wse_server.core.types`)."""
