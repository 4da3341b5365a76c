"""SQLite history of jobs and images, next to the outputs.

Two tables: `jobs` (one row per submitted job, with its state and timings) and `images` (one row
per saved image with every parameter). Invariant: an image row never points at a missing file
without being marked so (`file_state = 'missing'`); `reconcile()` restores that after a crash.
Rows are read by column name, so a newer version's extra columns do no harm; the tables' version is
kept in `PRAGMA user_version` for the migrations of later versions.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from webui.storage.outputs import resolve_inside

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    origin TEXT NOT NULL,
    request_json TEXT NOT NULL,
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    owner_key TEXT
);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL REFERENCES jobs(id),
    created_at REAL NOT NULL,
    path TEXT NOT NULL,
    file_state TEXT NOT NULL DEFAULT 'ok',
    prompt TEXT NOT NULL,
    negative_prompt TEXT NOT NULL,
    seed INTEGER NOT NULL,
    steps INTEGER NOT NULL,
    sampler TEXT NOT NULL,
    scheduler TEXT NOT NULL,
    cfg_scale REAL NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    clip_skip INTEGER NOT NULL,
    model_name TEXT,
    model_hash TEXT,
    image_index INTEGER NOT NULL,
    nsfw INTEGER NOT NULL DEFAULT 0,
    seconds REAL,
    infotext TEXT NOT NULL
);
"""
# After the column check: on a table without these columns the index would fail like a locked database.
INDEXES = """
CREATE INDEX IF NOT EXISTS images_created ON images(created_at DESC);
CREATE INDEX IF NOT EXISTS images_path ON images(path);
"""

SCHEMA_VERSION = 2  # PRAGMA user_version: raise it, and migrate in _open, when the tables change
JOB_COLUMNS = ("id", "state", "origin", "request_json", "error", "created_at", "started_at", "finished_at",
               "owner_key")
IMAGE_COLUMNS = (
    "job_id", "path", "prompt", "negative_prompt", "seed", "steps", "sampler", "scheduler", "cfg_scale",
    "width", "height", "clip_skip", "model_name", "model_hash", "image_index", "nsfw", "seconds", "infotext",
)


@dataclass
class HistoryImage:
    id: int
    job_id: str
    job_state: str
    created_at: float
    path: str
    file_state: str
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    sampler: str
    scheduler: str
    cfg_scale: float
    width: int
    height: int
    clip_skip: int
    model_name: str | None
    model_hash: str | None
    image_index: int
    nsfw: bool
    seconds: float | None
    infotext: str


# The images table's columns that HistoryImage holds (job_state comes from the jobs table).
_IMAGE_FIELDS = tuple(f.name for f in fields(HistoryImage) if f.name != "job_state")
_SELECT_IMAGES = ("SELECT " + ", ".join(f"images.{name}" for name in _IMAGE_FIELDS) + ", jobs.state AS job_state"
                  " FROM images JOIN jobs ON jobs.id = images.job_id")


def _open(db_path: Path | str) -> sqlite3.Connection:
    db = sqlite3.connect(str(db_path), check_same_thread=False, isolation_level=None)
    try:
        db.row_factory = sqlite3.Row
        # SQLite's LIKE folds ASCII letters only; search compares casefolded text in Python instead.
        db.create_function("folded_contains", 2, _folded_contains, deterministic=True)
        db.execute("PRAGMA journal_mode=WAL")
        # In WAL mode NORMAL never corrupts the database; a power cut may lose the last row only.
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(SCHEMA)
        _migrate(db)
        _check_columns(db)
        db.executescript(INDEXES)
        if db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:  # a newer version's number stays
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        # Damage past the first pages shows only when read; find it now, not in the middle of a run.
        verdict = db.execute("PRAGMA quick_check").fetchone()[0]
        if verdict != "ok":
            raise sqlite3.DatabaseError(f"quick_check found damage: {verdict}")
    except sqlite3.DatabaseError:
        db.close()
        raise
    return db


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a database of an older version up to this one's tables."""
    jobs = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
    if "owner_key" not in jobs:  # version 1: jobs had no owner
        db.execute("ALTER TABLE jobs ADD COLUMN owner_key TEXT")


def owner_key(owner: str | None) -> str | None:
    """What the history keeps of a job's owner: a hash, since a web-UI job's owner is its tab's secret token."""
    return None if owner is None else hashlib.sha256(owner.encode("utf-8", "surrogatepass")).hexdigest()


def _check_columns(db: sqlite3.Connection) -> None:
    """A table without a column we use (a hand-edited file) cannot be used: raise, as for damage, so it is set
    aside. Extra columns (a newer version's) are fine."""
    for table, wanted in (("jobs", JOB_COLUMNS), ("images", _IMAGE_FIELDS)):
        have = {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}
        missing = [name for name in wanted if name not in have]
        if missing:
            raise sqlite3.DatabaseError(f"its {table} table lacks the column(s) {', '.join(missing)}")


def _set_aside(db_path: Path) -> Path:
    """Rename a damaged database (and its WAL files) out of the way; returns its new name."""
    kept = db_path.with_name(f"{db_path.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
    for suffix in ("", "-wal", "-shm"):
        part = db_path.with_name(db_path.name + suffix)
        if part.exists():
            part.replace(kept.with_name(kept.name + suffix))
    return kept


class History:
    """Thread-safe access to the history database (one connection, one lock)."""

    def __init__(self, db_path: Path, outdir: Path):
        self.outdir = Path(outdir)
        # rows a locked database could not take, kept for the next start (keep_for_later)
        self.later_path = Path(db_path).with_name(Path(db_path).name + ".later.jsonl")
        Path(db_path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._changes = 0  # image rows added, deleted or marked here: see fingerprint()
        try:
            self._db = _open(db_path)
        except sqlite3.OperationalError as err:  # a full disk, locked, read-only: not damage, so kept as it is
            log.error("the history database %s cannot be opened (%s), so this run keeps its history in memory only, "
                      "lost when the app stops (images still go to %s while there is room). Free some disk space, "
                      "make the folder writable or close the program that holds the database, then restart to keep "
                      "the history again", db_path, err, self.outdir)
            self._db = _open(":memory:")
        except sqlite3.DatabaseError as err:
            # The images are safe on disk; a damaged database must not keep the app from starting.
            kept = _set_aside(Path(db_path))
            log.error("the history database %s cannot be read (%s); it was renamed to %s and a new, empty "
                      "history begins (the images in %s are untouched)", db_path, err, kept.name, self.outdir)
            self._db = _open(db_path)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- jobs -----------------------------------------------------------------------------
    def add_job(self, job_id: str, origin: str, request: dict[str, Any], created_at: float,
                owner: str | None = None, hashed_owner: str | None = None) -> None:
        """`owner` is kept hashed (owner_key); `hashed_owner`: already so (a row kept for later)."""
        self._execute(
            "INSERT INTO jobs (id, state, origin, request_json, created_at, owner_key) VALUES (?, 'queued', ?, ?, ?, ?)",
            (job_id, origin, json.dumps(request), created_at, hashed_owner or owner_key(owner)),
        )

    def keep_for_later(self, job: dict[str, Any], images: list[dict[str, Any]]) -> None:
        """A job's rows the database would not take (locked past its wait, by another program): one JSON line in
        a file beside it, which the next start's reconcile writes in. `job`: add_job's values (with the owner
        hashed) and its state; `images`: add_image's, each with the time it is kept (its place in the history).
        OSError where that file cannot be written either."""
        now = time.time()
        entry = {"job": job, "images": [{"created_at": now} | row | {"path": Path(row["path"]).as_posix()}
                                        for row in images]}
        line = (json.dumps(entry) + "\n").encode("utf-8")
        with self._lock, open(self.later_path, "a+b") as file:
            # a line a full disk cut short must not swallow this one: it starts on a line of its own
            file.write(line if _ends_a_line(file) else b"\n" + line)

    def _write_kept_rows(self) -> int:
        """The rows kept for later, written in now (those of files gone since are left out); how many images.
        The file is moved aside first: what another server sharing the folder keeps meanwhile goes to a new one."""
        # those a crash left before they were written in, then the file now, under a name of this start's own (two
        # servers starting at once never take the same)
        written = sum(self._write_in(left) for left in self.later_path.parent.glob(self.later_path.name + ".taken-*"))
        taken = self.later_path.with_name(f"{self.later_path.name}.taken-{uuid.uuid4().hex}")
        try:
            os.replace(self.later_path, taken)
        except FileNotFoundError:
            return written
        return written + self._write_in(taken)

    def _write_in(self, kept: Path) -> int:
        try:
            text = kept.read_bytes().decode("utf-8", errors="replace")  # a damaged line fails alone, below
        except FileNotFoundError:
            return 0
        written = 0
        for line in filter(str.strip, text.splitlines()):
            try:
                written += self._write_entry(json.loads(line))
            except (ValueError, KeyError, TypeError) as err:  # a line cut short by a crash: its files stay on disk
                log.warning("history rows kept for later could not be read (%s: %s); left out", type(err).__name__,
                            err)
        kept.unlink(missing_ok=True)  # another server's start may have written it in too (twice is harmless)
        return written

    def _write_entry(self, entry: dict[str, Any]) -> int:
        job, images, written = entry["job"], entry["images"], 0
        if self.get_job(job["job_id"]) is None:
            self.add_job(job["job_id"], job["origin"], job["request"], job["created_at"],
                         hashed_owner=job.get("owner_key"))
        self.set_job_state(job["job_id"], job["state"], error=job.get("error"),
                           started_at=job.get("started_at"), finished_at=job.get("finished_at"))
        for row in images:
            if self._file_exists(row["path"]):
                self.add_image(**row)
                written += 1
        return written

    def set_job_state(self, job_id: str, state: str, *, error: str | None = None,
                      started_at: float | None = None, finished_at: float | None = None) -> None:
        self._execute(
            "UPDATE jobs SET state = ?, error = ?, started_at = COALESCE(?, started_at),"
            " finished_at = COALESCE(?, finished_at) WHERE id = ?",
            (state, error, started_at, finished_at, job_id),
        )

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        row = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return dict(row[0]) if row else None

    # --- images ---------------------------------------------------------------------------
    def add_image(self, created_at: float | None = None, **values: Any) -> int:
        """A picture's row; `created_at` (its place in the history, newest first): now, unless given."""
        missing = set(IMAGE_COLUMNS) - values.keys()
        if missing:
            raise ValueError(f"history row lacks {sorted(missing)}")
        values["path"] = Path(values["path"]).as_posix()  # "/" on Windows too: one outputs/ serves both
        values["nsfw"] = int(bool(values["nsfw"]))
        values["seed"] = _stored_seed(values["seed"])
        names = ", ".join(IMAGE_COLUMNS)
        marks = ", ".join("?" for _ in IMAGE_COLUMNS)
        with self._lock:
            # The new file owns its path. A row of an older file there (deleted by hand, its number taken
            # again before anyone listed the history) would show this picture with the old settings.
            self._db.execute("DELETE FROM images WHERE path = ?", (values["path"],))
            cursor = self._db.execute(
                f"INSERT INTO images (created_at, {names}) VALUES (?, {marks})",
                (time.time() if created_at is None else created_at, *(values[c] for c in IMAGE_COLUMNS)),
            )
            self._changes += 1
            return int(cursor.lastrowid)

    def fingerprint(self) -> tuple[int, int]:
        """What changes when the images do: the changes made here, and SQLite's data_version, which moves
        when another connection (a second server on this folder) commits. Cheap at any size, for pages that
        poll (a count reads every row)."""
        with self._lock:
            return self._changes, self._db.execute("PRAGMA data_version").fetchone()[0]

    def list_images(self, page: int = 0, page_size: int = 24, search: str = "") -> tuple[list[HistoryImage], int]:
        """One page of the images whose file exists, newest first, optionally filtered by prompt
        text; and their total. Files deleted by hand while the app runs are found here, page by page:
        their rows are marked missing and the page is read again, so counts and pages stay right."""
        while True:
            rows, total = self._read_page(page, page_size, search)
            gone = [row.id for row in rows if not self._file_exists(row.path)]
            if not gone:
                return rows, total
            try:
                self._set_file_state(gone, "missing")
            except sqlite3.OperationalError as err:  # locked by another program: the next listing tries again
                log.warning("history: %d image(s) deleted by hand are not marked missing yet (%s)", len(gone), err)
                return [row for row in rows if row.id not in gone], total - len(gone)

    def _read_page(self, page: int, page_size: int, search: str) -> tuple[list[HistoryImage], int]:
        where, args = "WHERE images.file_state = 'ok'", ()
        if search.strip():
            where += " AND folded_contains(images.prompt, ?)"
            args = (search.strip().casefold(),)
        total = self._query(f"SELECT COUNT(*) FROM images {where}", args)[0][0]
        rows = self._query(
            f"{_SELECT_IMAGES} {where} ORDER BY images.created_at DESC, images.id DESC LIMIT ? OFFSET ?",
            (*args, page_size, max(page, 0) * page_size),
        )
        return [_to_image(r) for r in rows], int(total)

    def get_image(self, image_id: int) -> HistoryImage | None:
        rows = self._query(f"{_SELECT_IMAGES} WHERE images.id = ?", (image_id,))
        return _to_image(rows[0]) if rows else None

    def delete_image(self, image_id: int) -> bool:
        """Remove the file, then the row. Marking first means a crash in between leaves a row
        flagged 'missing' rather than one pointing at nothing."""
        image = self.get_image(image_id)
        if image is None:
            return False
        self._set_file_state([image_id], "missing")
        path = self._file(image.path)
        try:
            path.unlink(missing_ok=True)
        except OSError:  # the file is still there (read-only folder, in use): so is its row
            self._set_file_state([image_id], "ok")
            raise
        self._execute("DELETE FROM images WHERE id = ?", (image_id,))
        for beside in (".txt", ".jpg"):  # the Settings' text file and JPG copy: the picture and its row are gone
            try:
                if path.with_suffix(beside) != path:
                    path.with_suffix(beside).unlink(missing_ok=True)
            except OSError as err:
                log.warning("deleted %s but not the %s file beside it: %s", path, beside, err)
        return True

    def reconcile(self, fail_unfinished_jobs: bool = True) -> dict[str, int]:
        """After a restart: flag rows whose file is gone, show again those whose file is back (a folder
        moved away and back), and fail jobs a crash left unfinished (not when another running server shares
        the folder: the unfinished jobs may be its own)."""
        written_late = self._write_kept_rows()
        rows = self._query("SELECT id, path, file_state FROM images")
        found = {r["id"]: self._file_exists(r["path"]) for r in rows}
        gone = [r["id"] for r in rows if r["file_state"] == "ok" and not found[r["id"]]]
        back = [r["id"] for r in rows if r["file_state"] == "missing" and found[r["id"]]]
        self._set_file_state(gone, "missing")
        self._set_file_state(back, "ok")
        stale = 0
        with self._lock:
            if fail_unfinished_jobs:
                stale = self._db.execute(
                    "UPDATE jobs SET state = 'failed', error = 'stopped by a restart', finished_at = ?"
                    " WHERE state IN ('queued', 'running')", (time.time(),)).rowcount
        return {"missing_files": len(gone), "files_back": len(back), "stale_jobs": stale,
                "rows_written_late": written_late}

    def _set_file_state(self, image_ids: list[int], state: str) -> None:
        with self._lock:
            self._db.executemany("UPDATE images SET file_state = ? WHERE id = ?", [(state, i) for i in image_ids])
            self._changes += 1

    def _file(self, path: str) -> Path:
        return resolve_inside(self.outdir, path)

    def _file_exists(self, path: str) -> bool:
        try:
            return self._file(path).exists()
        except ValueError:  # a row pointing outside outputs/ (a hand-edited database) counts as gone
            return False

    def _execute(self, sql: str, args: tuple = ()) -> None:
        with self._lock:
            self._db.execute(sql, args)

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()


def _folded_contains(text: str | None, folded_needle: str) -> bool:
    """Whether text holds the casefolded search text, in any letter case and any script ("ünïcode"
    finds "ÜNÏCODE", "strasse" finds "Straße"). No wildcards: % and _ match themselves."""
    return folded_needle in (text or "").casefold()


def _to_image(row: sqlite3.Row) -> HistoryImage:
    values = dict(row)
    values["nsfw"] = bool(values["nsfw"])
    values["seed"] = values["seed"] + 2**64 if values["seed"] < 0 else values["seed"]  # (_stored_seed)
    return HistoryImage(**values)


def _stored_seed(seed: int) -> int:
    """A seed as SQLite keeps it: its integers are signed 64-bit, and seeds go up to 2**64 - 1, so one from 2**63 up
    is kept as the negative number of the same 64 bits (_to_image reads it back)."""
    return seed - 2**64 if seed >= 2**63 else seed


def _ends_a_line(file) -> bool:
    """Whether a file open for reading bytes is empty or ends with a newline."""
    if file.seek(0, os.SEEK_END) == 0:
        return True
    file.seek(-1, os.SEEK_END)
    return file.read(1) == b"\n"
