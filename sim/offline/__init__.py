"""Offline algorithms over a whole replay: its steps, the best schedule of loads, a lower bound."""
