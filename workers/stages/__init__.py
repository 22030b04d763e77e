"""The three stage servers (gRPC) and the worker process that hosts them."""
