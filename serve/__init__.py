"""The PGASR HTTP service on Ray Serve (``serve.app:build_app``); see ``docs/serve.md``."""
