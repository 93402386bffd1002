"""The layer under HTTP: the event loop and the connection base every side shares."""
