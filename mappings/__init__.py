"""Mapping files: device profiles, connector examples and the demo configuration."""
