"""Who may talk to whom: mutual TLS between the stages, router API keys, and the
guard that keeps image URLs off private addresses."""
