"""The simulation engine: the replay of a trace's steps on a machine under policies."""
