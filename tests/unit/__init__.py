"""Unit tests: no server and no service process (fakes, files, a short CLI run at most)."""
