"""Ray Serve application for trained adapters (see issue 5)."""
