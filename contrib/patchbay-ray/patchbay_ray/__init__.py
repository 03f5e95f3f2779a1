"""patchbay on Ray Serve."""
