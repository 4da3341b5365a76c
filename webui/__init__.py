"""diffusers-webui: a Stable Diffusion web UI and A1111-compatible API built on diffusers."""

__version__ = "0.1.0"
