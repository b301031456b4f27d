"""Per-item result cache: (model, task, task settings, item) -> result, in one SQLite file.

A re-run of the same model on the same task skips every item already evaluated, so an
interrupted evaluation resumes where it stopped. Changing the model's files (size/mtime), the
task's data or any task option changes the key, so stale results are never reused.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path


class ResultCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30)
        self.db.execute("CREATE TABLE IF NOT EXISTS results (model TEXT, task TEXT, settings TEXT, item TEXT, "
                        "result TEXT, PRIMARY KEY (model, task, settings, item))")
        self.db.commit()

    def get(self, model: str, task: str, settings: str, items: list[str]) -> dict[str, dict]:
        found = {}
        for start in range(0, len(items), 500):  # SQLite caps the number of bound parameters
            keys = items[start: start + 500]
            rows = self.db.execute(
                f"SELECT item, result FROM results WHERE model=? AND task=? AND settings=? "
                f"AND item IN ({','.join('?' * len(keys))})", (model, task, settings, *keys))
            found.update({item: json.loads(result) for item, result in rows})
        return found

    def put(self, model: str, task: str, settings: str, results: dict[str, dict]) -> None:
        self.db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?)",
                            [(model, task, settings, k, json.dumps(v)) for k, v in results.items()])
        self.db.commit()

    def close(self) -> None:
        self.db.close()
