"""What-if: webchat with one extra SQLite connection held open for the worker's life.

While any connection to the database stays open, closing the others does not
checkpoint the WAL (and fsync). Comparing this app with webchat as it is shows
what that costs:

    python bench/run.py --servers webchat --streams 325 --rates 20 --search-steps 0 \\
        --no-fast --no-idle --no-profile --no-report --out /tmp/keeper.json \\
        --webchat-app keeper_app:app --pythonpath bench/whatif
"""

from __future__ import annotations

import sqlite3

from webchat import create_app

app = create_app()
_keeper = sqlite3.connect(app.config["DATABASE"], check_same_thread=False)
_keeper.execute("SELECT 1 FROM sqlite_master").fetchone()
