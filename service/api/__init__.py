"""Routes and request/response contracts: errors, dependencies, health, /v1, /v2. Imports no torch."""
