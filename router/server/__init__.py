"""Serving over HTTP: the app factory, security headers, connection limits, worker supervision."""
