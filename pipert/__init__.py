"""pipert: a real-time pipeline daemon for video and sensor analytics."""
