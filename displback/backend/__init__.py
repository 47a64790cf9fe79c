"""The backend: guest devices, connectors, buffers; serves displif over a platform."""
