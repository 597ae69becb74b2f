"""Dictionaries on disk: our run folder and other libraries' files."""
