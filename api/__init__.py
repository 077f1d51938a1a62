"""HTTP edge: FastAPI app factory, dependencies, problem documents and /v1 routers. Imports only ``core``."""
