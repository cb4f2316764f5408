"""The embedded instruction dataset (see make_tasks.py for how it is written)."""
