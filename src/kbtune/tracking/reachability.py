"""Is the tracking store there? One quick probe before anything is created: MLflow's own client would
retry an unreachable server for about four minutes and then raise a raw traceback."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from urllib.parse import quote

from kbtune.configuration import ConfigError

# Long enough for a busy server on a slow link, short enough that a wrong URI fails while the user waits.
PROBE_TIMEOUT_S = 5.0


class StoreUnavailable(ConfigError):
    """The tracking store cannot be reached or read. A ConfigError on `tracking.uri`: the entry points
    already report those as one message (exit code 2), and the key is what the user changes."""

    def __init__(self, uri: str, why: str, hint: str):
        self.uri = uri
        self.problems = [f"tracking.uri: the MLflow store at {uri} {why}; {hint}"]
        # Not "invalid configuration": the value may be right and the server down.
        ValueError.__init__(self, self.problems[0])


def check_store(uri: str, experiment: str = "kbtune", timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise StoreUnavailable unless the store at `uri` answers within `timeout` seconds. Creates
    nothing: a missing SQLite file is fine (the first write creates it)."""
    if uri.startswith(("http://", "https://")):
        _check_server(uri, experiment, timeout)
    elif uri.startswith("sqlite:///"):
        _check_sqlite(uri, timeout)


def _check_server(uri: str, experiment: str, timeout: float) -> None:
    import urllib.error
    import urllib.request

    # A real API call rather than /health, which servers behind a gateway may not route. Any HTTP
    # answer below 500 (404 for an experiment not created yet, 401 before credentials) means reachable.
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?experiment_name={quote(experiment)}"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return
    except urllib.error.HTTPError as exc:
        if exc.code < 500:
            return
        why = f"answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        why = f"is unreachable ({reason})" if str(reason) else "is unreachable"
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            why = f"did not answer within {timeout:.0f} s"
    raise StoreUnavailable(
        uri, why, "start the server (mlflow server ...) or select the local store with tracking=mlflow"
    )


def _check_sqlite(uri: str, timeout: float) -> None:
    path = Path(uri.removeprefix("sqlite:///"))
    if not path.exists():
        return
    try:
        # Read-only: a check must never change the store, even its journal.
        with closing(sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=timeout)) as db:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc):
            raise StoreUnavailable(uri, f"stayed locked by another process for {timeout:.0f} s",
                                   "let that process finish, or point tracking.uri elsewhere") from exc  # fmt: skip
        raise StoreUnavailable(uri, f"cannot be read ({exc})", f"check {path}") from exc
    except sqlite3.DatabaseError as exc:
        raise StoreUnavailable(uri, f"is not an SQLite database ({exc})",
                               f"restore {path} from a backup or point tracking.uri at another file") from exc  # fmt: skip
