"""kproxy's model: immutable objects, the change-tracking store and endpoint selection.

Standard library only; no I/O. See objects.py (the objects), store.py (the store and snapshots),
endpoints.py (merge and categorize) and view.py (service ports as renderers see them).
"""
