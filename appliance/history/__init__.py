"""The call history: one row per call in SQLite (state_dir/history.sqlite3).

`store.CallHistory` owns the database (schema and migrations, one writer thread, readers);
`recorder.HistoryRecorder` is a `CallEvents` sink that turns the router's events into rows.
"""
