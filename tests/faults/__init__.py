"""Fault tests: real processes killed, real servers stopped, under the game's load."""
