"""`epd worker` and `epd serve`: processes on one machine."""
