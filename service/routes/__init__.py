"""The API's routers: jobs, models and aliases, predict, and operations."""
