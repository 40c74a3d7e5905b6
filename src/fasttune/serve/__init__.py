"""`fasttune serve`: an OpenAI-compatible HTTP server over continuous batching, and the runs web page."""
