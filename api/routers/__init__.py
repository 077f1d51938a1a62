"""/v1 routers (thin: parse, call core, shape the response)."""
