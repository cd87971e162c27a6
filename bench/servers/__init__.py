"""One small server script per library, each run as its own process by the suite.

Each prints `{"ev":"ready","port":P}` when listening, reads JSON commands on
stdin (`broadcast`, `count`) and prints `{"ev":"closed","wall":T}` when it closes
a connection (tether's own log line `Closing stale connection` serves instead).
"""
