"""The OpenAI-compatible HTTP router: parses, hashes images, plans the route, streams."""
