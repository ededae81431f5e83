"""The call history: one row per call in SQLite (state_dir/history.sqlite3).

`service.CallHistory` owns the file (migrations at open, the writer process `writer.py`, readers);
`store` is the database itself (schema, migrations, insert, prune, query);
`recorder.HistoryRecorder` is a `CallEvents` sink that turns the router's events into rows.
"""
