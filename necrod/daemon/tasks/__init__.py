"""The dispatcher's rooms. ``necrod.daemon.dispatcher.Dispatcher`` builds them and hands each
what it uses; none imports another except for the shared ``runs`` (the table of active runs,
the task group) and ``profiles`` (which profiles and places could run a task)."""
