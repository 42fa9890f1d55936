"""Sessions: a conversation's decode state, kept in memory and persisted in SQLite.

A session is the state after every token it has consumed, plus the one token
it generated last and has not consumed yet (``pending``): the next request
feeds ``pending + prompt``, so continuing a session costs no extra call. Its
``position`` counts the consumed tokens.

The store is one SQLite file in WAL mode. Each completed request rewrites its
session's row in one transaction (``synchronous=FULL``), so a kill -9 at any
moment leaves every row as of its last completed request; each row carries the
sha256 of its state, checked on load, and the file records which model its
states belong to (a store of another model is refused, never resumed).

Policy: a session idle longer than ``ttl_s`` is evicted (memory and store) by
the periodic sweep; past ``max_sessions`` the least recently used idle session
is evicted to make room. Softmax sessions' KV caches together stay under
``kv_budget_bytes``: a request that would grow them past it is refused.
Cummax states are constant-size, so cummax sessions are bounded only by
``max_sessions`` and the disk.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from samout_edge.artifact.arch import SEQ_AXIS, ArchSpec
from samout_edge.errors import SamoutError
from samout_edge.serve.errors import ApiError

SCHEMA_VERSION = 1


@dataclass
class Session:
    id: str
    state: dict[str, np.ndarray]  # batch 1, the graph's input names and dtypes
    position: int = 0  # tokens consumed into the state
    pending: list[int] = field(default_factory=list)  # generated, not yet consumed
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    busy: bool = False  # a request is running on it
    owner: str | None = None  # the API key that created it, as a digest (serve/http.py: key_owner); None: anyone
    # the request that moved it last: {"from_position", "request" (its digest), "response" (the body)}, committed
    # with the state, so a client that lost the answer to a kill -9 gets it again (completion.py: replayed_turn)
    last_turn: dict | None = None

    @property
    def state_bytes(self) -> int:
        return sum(a.nbytes for a in self.state.values())

    def to_dict(self) -> dict:
        return {"id": self.id, "object": "session", "position": self.position, "pending_tokens": len(self.pending),
                "state_bytes": self.state_bytes, "created": int(self.created), "last_used": int(self.last_used)}


def encode_state(state: dict[str, np.ndarray]) -> bytes:
    """A JSON header line (name, dtype, shape per array) then the raw bytes, in order."""
    header = [[name, a.dtype.str, list(a.shape)] for name, a in state.items()]
    return json.dumps(header).encode() + b"\n" + b"".join(np.ascontiguousarray(a).tobytes() for a in state.values())


def decode_state(blob: bytes) -> dict[str, np.ndarray]:
    head, _, body = blob.partition(b"\n")
    state, offset = {}, 0
    for name, dtype, shape in json.loads(head):
        dt = np.dtype(dtype)
        size = int(np.prod(shape)) * dt.itemsize
        if offset + size > len(body):
            raise ValueError("state blob is shorter than its header says")
        state[name] = np.frombuffer(body, dt, count=int(np.prod(shape)), offset=offset).reshape(shape).copy()
        offset += size
    if offset != len(body):
        raise ValueError("state blob is longer than its header says")
    return state


class SessionError(ApiError):
    """A request the session table refuses (unknown, busy, too many, a full KV budget, the
    store): an ApiError like every refusal, with the HTTP status to answer with."""


class StoreUnavailable(SessionError):
    """The store could not record a change: the change is not made (in memory either)."""

    def __init__(self, message: str):
        super().__init__(message, 503, "store_unavailable")


class SessionStore:
    """The SQLite file. One connection, used under a lock from any thread.

    One store, one server: the file is locked (flock) while a server holds it, so a
    second server on it is refused at start instead of forking its sessions. The
    file's identity (device, inode) is checked on every write: a store deleted or
    replaced under a running server fails the request that would have written to
    it, instead of writing into an unlinked file. New stores are 0600: states are
    user data.
    """

    def __init__(self, path: str | Path, model_fingerprint: str, busy_timeout_s: float = 5.0):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_file():
            raise SamoutError(f"--store {self.path} exists and is not a file")
        if not self.path.parent.is_dir():
            raise SamoutError(f"--store {self.path}: directory {self.path.parent} does not exist")
        self.lock = threading.Lock()
        self.lock_fd: int | None = None
        created = False
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)  # before SQLite makes it 0644
            os.close(fd)
            created = True
        except FileExistsError:
            pass
        except OSError as e:
            raise SamoutError(f"--store {self.path}: cannot create it: {e.strerror or e}") from None
        try:
            self.db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None,
                                      timeout=busy_timeout_s)
            tables = {row[0] for row in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not created and tables and not {"meta", "sessions"} <= tables:
                raise SamoutError(f"--store {self.path} is a SQLite file of something else (tables: "
                                  f"{', '.join(sorted(tables))}); give a new file")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self._hold_lock()
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self.db.execute("CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, position INTEGER NOT NULL, "
                            "pending TEXT NOT NULL, state BLOB NOT NULL, state_sha256 TEXT NOT NULL, "
                            "created REAL NOT NULL, last_used REAL NOT NULL, owner TEXT, last_turn TEXT)")
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(sessions)")}
            if "owner" not in columns:  # a store written before API keys: its sessions belong to no key
                self.db.execute("ALTER TABLE sessions ADD COLUMN owner TEXT")
            if "last_turn" not in columns:  # a store written before replays: no turn to replay
                self.db.execute("ALTER TABLE sessions ADD COLUMN last_turn TEXT")
            self._check_meta(model_fingerprint)
        except sqlite3.DatabaseError as e:
            self.close()
            raise SamoutError(f"--store {self.path} is not a usable SQLite file: {e}") from None
        except BaseException:
            self.close()
            raise
        for suffix in ("", "-wal", "-shm"):  # ours: states are user data, readable by this user only
            extra = Path(f"{self.path}{suffix}")
            if extra.is_file() and extra.stat().st_mode & 0o077:
                extra.chmod(0o600)
        stat = self.path.stat()
        self.identity = (stat.st_dev, stat.st_ino)

    def _hold_lock(self) -> None:
        """flock the store for this process's lifetime (released by the kernel on any exit, kill -9 too)."""
        try:
            import fcntl
        except ImportError:  # no flock on this platform: one server per store is then the user's to keep
            return
        self.lock_fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            try:
                row = self.db.execute("SELECT value FROM meta WHERE key = 'server'").fetchone()
                holder = f" ({row[0]})" if row else ""
            except sqlite3.DatabaseError:
                pass
            raise SamoutError(f"--store {self.path} is in use by another samout-edge serve{holder}: one store, one "
                              "server; give this one another --store") from None
        with self.lock:
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('server', ?)",
                            (f"pid {os.getpid()} on {socket.gethostname()}",))

    def _check_meta(self, fingerprint: str) -> None:
        meta = dict(self.db.execute("SELECT key, value FROM meta WHERE key != 'server'").fetchall())
        if not meta:
            with self.lock:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.executemany("INSERT INTO meta VALUES (?, ?)",
                                    [("schema_version", str(SCHEMA_VERSION)), ("model", fingerprint)])
                self.db.execute("COMMIT")
            return
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise SamoutError(f"--store {self.path} has schema {meta.get('schema_version')!r}, not {SCHEMA_VERSION}")
        if meta.get("model") != fingerprint:
            raise SamoutError(f"--store {self.path} holds sessions of another model ({meta.get('model')}); "
                              f"this one is {fingerprint}: give another --store")

    def check(self) -> None:
        """The file this server opened is still the one at the store's path."""
        try:
            stat = self.path.stat()
        except OSError:
            raise StoreUnavailable(f"the session store {self.path} was removed while serving; nothing is persisted "
                                   "any more: restart serve") from None
        if (stat.st_dev, stat.st_ino) != self.identity:
            raise StoreUnavailable(f"the session store {self.path} was replaced while serving; restart serve")
        for suffix in ("-wal", "-shm"):
            # SQLite maps -shm into memory: growing an unwritable one (chattr +i, a read-only bind mount) is a
            # SIGBUS that kills the server, so a write is refused before SQLite touches it
            extra = f"{self.path}{suffix}"
            if os.path.exists(extra) and not os.access(extra, os.W_OK):
                raise StoreUnavailable(f"the session store's {extra} is not writable (immutable, read-only or not "
                                       "ours); nothing is persisted until it is")

    def _write(self, sql: str, params: tuple) -> None:
        with self.lock:
            self.check()
            try:
                self.db.execute(sql, params)
            except sqlite3.Error as e:  # locked by another process, disk full, I/O error
                raise StoreUnavailable(f"the session store {self.path} cannot record it ({e}); nothing was changed"
                                       ) from None

    def save(self, session: Session) -> None:
        blob = encode_state(session.state)
        turn = None if session.last_turn is None else json.dumps(session.last_turn)
        row = (session.id, session.position, json.dumps(session.pending), blob, hashlib.sha256(blob).hexdigest(),
               session.created, session.last_used, session.owner, turn)
        self._write("INSERT OR REPLACE INTO sessions (id, position, pending, state, state_sha256, created, last_used, "
                    "owner, last_turn) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)

    def delete(self, session_id: str) -> None:
        self._write("DELETE FROM sessions WHERE id = ?", (session_id,))

    def load_all(self) -> tuple[list[Session], list[str]]:
        """Every session, and the ids of rows that fail their checksum (left in place, reported)."""
        sessions, corrupt = [], []
        with self.lock:
            rows = self.db.execute("SELECT id, position, pending, state, state_sha256, created, last_used, owner, "
                                   "last_turn FROM sessions").fetchall()
        for sid, position, pending, blob, digest, created, last_used, owner, turn in rows:
            try:
                if hashlib.sha256(blob).hexdigest() != digest:
                    raise ValueError("checksum mismatch")
                sessions.append(Session(sid, decode_state(blob), int(position), [int(t) for t in json.loads(pending)],
                                        float(created), float(last_used), owner=owner,
                                        last_turn=None if turn is None else json.loads(turn)))
            except (ValueError, TypeError):
                corrupt.append(sid)
        return sessions, corrupt

    def close(self) -> None:
        with self.lock:
            if getattr(self, "db", None) is not None:
                self.db.close()
                self.db = None
            if self.lock_fd is not None:
                os.close(self.lock_fd)  # releases the flock
                self.lock_fd = None


@dataclass
class SessionPolicy:
    max_sessions: int = 10_000
    ttl_s: float = 24 * 3600.0
    kv_budget_bytes: int | None = None  # softmax: all sessions' KV caches together


class SessionTable:
    """The live sessions (all of them, in memory), their policy, and the store behind them."""

    def __init__(self, store: SessionStore | None, initial_state: dict[str, np.ndarray], spec: ArchSpec, num_layers: int,
                 policy: SessionPolicy, owners: int = 1):
        self.store, self.initial, self.spec, self.policy = store, initial_state, spec, policy
        self.grows = {t.past for t in spec.states(num_layers) if t.grows}  # a KV cache: any length
        self.owners = max(1, owners)  # API keys: each holds at most its share of max_sessions
        self.sessions: dict[str, Session] = {}
        self.reserved = 0  # softmax: KV bytes that running requests may still add
        self.creating = 0  # sessions being written to the store: they count against max_sessions
        self.lock = threading.Lock()
        self.corrupt: list[str] = []
        if store is not None:
            loaded, self.corrupt = store.load_all()
            for s in loaded:
                if not self._fits(s.state):
                    self.corrupt.append(s.id)
                    continue
                self.sessions[s.id] = s

    def _fits(self, state: dict[str, np.ndarray]) -> bool:
        """A stored state feeds the graph only with its names, dtypes and shapes (the
        softmax cache may differ only in length): anything else would run wrong or fail."""
        if set(state) != set(self.initial):
            return False
        for name, a in state.items():
            want = self.initial[name]
            same = [i for i in range(want.ndim) if not (name in self.grows and i == SEQ_AXIS)]
            if a.dtype != want.dtype or a.ndim != want.ndim or any(a.shape[i] != want.shape[i] for i in same):
                return False
            if not np.isfinite(a).all():  # a poisoned or tampered state is never fed to the graph
                return False
        return True

    # -- accounting

    @property
    def state_bytes(self) -> int:
        return sum(s.state_bytes for s in self.sessions.values())

    def reserve(self, extra_bytes: int) -> int:
        """Reserve what a softmax request may add to the KV caches, refusing past the
        budget; running requests' reservations count, so two cannot both squeeze in.
        Returns the bytes reserved (give them back with ``unreserve``)."""
        budget = self.policy.kv_budget_bytes
        if not self.spec.grows or budget is None:
            return 0
        with self.lock:
            held = self.state_bytes + self.reserved
            if held + extra_bytes > budget:
                raise SessionError(f"the KV-cache budget ({budget / 2**20:.1f} MiB) is full: sessions hold "
                                   f"{held / 2**20:.1f} MiB and this request needs {extra_bytes / 2**20:.2f} MiB more; "
                                   "delete sessions or raise --kv-budget-mib", 429, "kv_budget_exhausted")
            self.reserved += extra_bytes
        return extra_bytes

    def unreserve(self, extra_bytes: int) -> None:
        with self.lock:
            self.reserved -= extra_bytes

    # -- lifecycle: the store first, memory only once the store has it

    @property
    def quota(self) -> int:
        """Sessions one API key may hold: with several keys, an equal share of max_sessions, so
        one key cannot evict the others' idle sessions to make room for its own."""
        return max(1, self.policy.max_sessions // self.owners)

    def create(self, owner: str | None = None) -> Session:
        """A new session, persisted first. The table's lock is never held while SQLite waits
        (another process may hold the store locked for seconds): only this request waits,
        reads and other sessions' requests go on."""
        session = Session(secrets.token_hex(12), {k: v.copy() for k, v in self.initial.items()}, owner=owner)
        with self.lock:
            victim = self._victim(owner)
            if victim is not None:
                victim.busy = True  # nobody takes it while its row goes
            self.creating += 1
        evicted = False
        try:
            if self.store is not None:
                if victim is not None:
                    self.store.delete(victim.id)
                evicted = victim is not None
                self.store.save(session)
        except BaseException:
            with self.lock:
                self.creating -= 1
                if victim is not None:
                    victim.busy = False
                    if evicted:  # gone from the store: gone from memory too
                        self.sessions.pop(victim.id, None)
            raise
        with self.lock:
            self.creating -= 1
            if victim is not None:
                self.sessions.pop(victim.id, None)
            self.sessions[session.id] = session
        return session

    def _victim(self, owner: str | None) -> Session | None:
        """The session to evict so ``owner`` gets a new one (None: there is room). A key at its
        share evicts its own least recently used idle session; a full table takes one of a key
        past its share (sessions of no key, from before keys, first), never another key's within it."""
        mine = [s for s in self.sessions.values() if s.owner == owner]
        if self.owners > 1 and len(mine) >= self.quota:
            return self._least_recent(mine, f"this API key's {len(mine)} sessions (its share of --max-sessions "
                                            f"{self.policy.max_sessions}: {self.quota}) are all busy")
        if len(self.sessions) + self.creating < self.policy.max_sessions:
            return None
        if self.owners == 1:
            return self._least_recent(list(self.sessions.values()), f"{len(self.sessions)} sessions are busy "
                                      f"(--max-sessions {self.policy.max_sessions})")
        held: dict[str | None, int] = {}
        for s in self.sessions.values():
            held[s.owner] = held.get(s.owner, 0) + 1
        over = [s for s in self.sessions.values() if s.owner != owner and held[s.owner] > self.quota]
        return self._least_recent(over or mine, f"the server holds {len(self.sessions)} sessions (--max-sessions "
                                  f"{self.policy.max_sessions}) and none this key may evict is idle")

    @staticmethod
    def _least_recent(candidates: list[Session], busy: str) -> Session:
        idle = [s for s in candidates if not s.busy]
        if not idle:
            raise SessionError(busy, 429, "too_many_sessions")
        return min(idle, key=lambda s: s.last_used)

    def get(self, session_id: str, owner: str | None = None) -> Session:
        """The session, if ``owner`` (the caller's key) may see it: another key's session is
        answered exactly as an unknown one, so its id tells nothing."""
        session = self.sessions.get(session_id)
        if session is None or (session.owner is not None and session.owner != owner):
            raise SessionError(f"no session {session_id!r} (unknown, deleted or expired)", 404, "session_not_found")
        return session

    def acquire(self, session_id: str, owner: str | None = None) -> Session:
        """Mark a session busy for one request; a second concurrent request on it is refused."""
        with self.lock:
            session = self.get(session_id, owner)
            if session.busy:
                raise SessionError(f"session {session_id} is running another request", 409, "session_busy")
            session.busy = True
            return session

    def release(self, session: Session) -> None:
        session.busy = False

    def commit(self, session: Session, state: dict[str, np.ndarray], consumed: int, pending: list[int],
               turn: Callable[[Session], dict] | None = None) -> None:
        """The request completed: the new state is persisted before the client hears so,
        and the session changes in memory only once the store has it (StoreUnavailable
        otherwise: the session stays as it was, in memory and on disk). ``turn`` makes the
        session's ``last_turn`` from the session after it (the response, to replay), in
        the same row and so the same SQLite commit as the state."""
        after = dataclasses.replace(session, state=state, position=session.position + consumed, pending=pending,
                                    last_used=time.time())
        after.last_turn = turn(after) if turn is not None else None
        if self.store is not None:
            self.store.save(after)
        session.state, session.position, session.pending = after.state, after.position, after.pending
        session.last_used, session.last_turn = after.last_used, after.last_turn

    def delete(self, session_id: str, owner: str | None = None) -> None:
        """Drop a session, store first; the table's lock is not held while SQLite waits."""
        with self.lock:
            session = self.get(session_id, owner)
            if session.busy:
                raise SessionError(f"session {session_id} is running a request", 409, "session_busy")
            session.busy = True
        self._drop([session])

    def _drop(self, sessions: list[Session]) -> int:
        """Delete these sessions (marked busy by the caller), store first, one by one; one the store
        cannot drop stays (in memory and on disk alike), and so do those after it. Returns how many went."""
        for done, session in enumerate(sessions):
            try:
                if self.store is not None:
                    self.store.delete(session.id)
            except BaseException:
                for rest in sessions[done:]:
                    rest.busy = False
                raise
            with self.lock:
                self.sessions.pop(session.id, None)
        return len(sessions)

    def sweep(self, now: float | None = None) -> int:
        """Evict sessions idle past the TTL; returns how many. One the store cannot drop
        stays (in memory and on disk alike) until a later sweep."""
        now = time.time() if now is None else now
        with self.lock:
            expired = [s for s in self.sessions.values() if not s.busy and now - s.last_used > self.policy.ttl_s]
            for session in expired:
                session.busy = True
        before = len(self.sessions)
        try:
            return self._drop(expired)
        except StoreUnavailable:
            return before - len(self.sessions)
