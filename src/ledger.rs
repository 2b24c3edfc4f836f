//! The run ledger: every job run, flow and background session, in SQLite
//! (`state_dir/ledger.sqlite`, WAL mode). This module alone changes a
//! run's state, and every change is one conditional UPDATE naming the
//! states it may leave, so nothing leaves a terminal state whatever path
//! tries: a transition that finds another state changes nothing and says
//! so.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::os::reaper::Exit;

/// The most memory the ledger's page cache takes, in KiB.
const LEDGER_CACHE_KIB: i64 = 256;
/// The schema this code reads and writes; older files are migrated.
pub const SCHEMA_VERSION: i64 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Queued,
    Running,
    /// A flow held before an approval step.
    Waiting,
    Succeeded,
    Failed,
    Cancelled,
}

impl RunState {
    pub const ACTIVE: &'static [RunState] = &[RunState::Queued, RunState::Running, RunState::Waiting];

    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Queued => "queued",
            RunState::Running => "running",
            RunState::Waiting => "waiting",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Queued, Self::Running, Self::Waiting, Self::Succeeded, Self::Failed, Self::Cancelled]
            .into_iter()
            .find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, RunState::Succeeded | RunState::Failed | RunState::Cancelled)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Job,
    Flow,
    Session,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Job => "job",
            Kind::Flow => "flow",
            Kind::Session => "session",
        }
    }
    fn parse(s: &str) -> Kind {
        match s {
            "flow" => Kind::Flow,
            "session" => Kind::Session,
            _ => Kind::Job,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    Schedule,
    Trigger,
    Resume,
    CatchUp,
    Bg,
    /// Run at start because a worker or job depends on it.
    Dependency,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Schedule => "schedule",
            Source::Trigger => "trigger",
            Source::Resume => "resume",
            Source::CatchUp => "catch-up",
            Source::Bg => "bg",
            Source::Dependency => "dependency",
        }
    }
    fn parse(s: &str) -> Source {
        match s {
            "schedule" => Source::Schedule,
            "resume" => Source::Resume,
            "catch-up" => Source::CatchUp,
            "bg" => Source::Bg,
            "dependency" => Source::Dependency,
            _ => Source::Trigger,
        }
    }
}

/// The supervisor incarnation that claimed a run: pid and process start
/// time, so a reused pid is never taken for a live owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: i32,
    pub start_ticks: u64,
}

/// One step of a flow, as recorded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub index: u32,
    pub name: String,
    pub state: RunState,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    pub id: i64,
    pub job: Option<String>,
    pub kind: Kind,
    pub source: Source,
    pub state: RunState,
    pub created_at: String,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    pub error: Option<String>,
    pub owner: Option<Owner>,
    pub parent: Option<i64>,
    /// A session's name.
    pub name: Option<String>,
    /// A session's command (jobs take theirs from the config).
    pub command: Vec<String>,
    /// For a flow, the step it is at.
    pub step: Option<u32>,
    pub pid: Option<i32>,
    pub pgid: Option<i32>,
    pub pid_start: Option<u64>,
    pub log: Option<PathBuf>,
    pub steps: Vec<StepRecord>,
}

/// What a new run is.
#[derive(Clone, Debug)]
pub struct NewRun<'a> {
    pub job: Option<&'a str>,
    pub kind: Kind,
    pub source: Source,
    pub parent: Option<i64>,
    pub name: Option<&'a str>,
    pub command: &'a [String],
    /// For a flow: its step names, and the first step to run.
    pub steps: &'a [String],
    pub first_step: u32,
}

pub type Result<T> = rusqlite::Result<T>;

pub fn now() -> String {
    crate::supervisor::clock::rfc3339(SystemTime::now())
}

pub fn path_in(state_dir: &Path) -> PathBuf {
    state_dir.join("ledger.sqlite")
}

pub struct Ledger {
    conn: Connection,
    path: PathBuf,
    /// The WAL file's (device, inode) as this connection knows it: a
    /// different one, or none, means someone deleted or replaced it.
    wal_id: Option<(u64, u64)>,
}

/// How long the supervisor's connection waits for another process's
/// write lock before giving up: short, because the actor waits with it;
/// work that finds the ledger locked is retried later instead.
pub const SUPERVISOR_BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(10);

/// Whether an error means another connection holds the lock (a retry
/// later will do), not that the ledger is broken.
pub fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// What opening the ledger for the supervisor found, beyond a good file.
#[derive(Debug, Default)]
pub struct OpenNotes {
    /// The damaged file that was moved aside (a new ledger was started).
    pub moved_aside: Option<(PathBuf, String)>,
    /// The file existed but was empty (0 bytes), and was started anew.
    pub was_empty: bool,
}

/// What a look at an existing ledger file found wrong.
enum Inspected {
    Damaged(String),
    Unreadable(String),
}

/// Why the supervisor has no ledger.
#[derive(Debug)]
pub enum OpenError {
    /// The file is from a newer drover: left untouched, jobs disabled.
    Newer {
        path: PathBuf,
        found: i64,
    },
    Other(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Newer { path, found } => write!(
                f,
                "{} has schema version {found}, newer than this drover's {SCHEMA_VERSION}; \
                 it was left untouched: run the newer drover, or move the file aside to start a new ledger",
                path.display()
            ),
            OpenError::Other(e) => f.write_str(e),
        }
    }
}

const RUN_COLUMNS: &str = "id, job, kind, source, state, created_at, started_at, ended_at, exit_code, signal, \
     error, owner_pid, owner_start, parent, name, command, step, pid, pgid, pid_start, log";

/// A path with `suffix` appended to its file name (`ledger.sqlite-wal`).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn other(e: impl std::fmt::Display) -> OpenError {
    OpenError::Other(e.to_string())
}

impl Ledger {
    /// Opens (creating and migrating) the ledger for the supervisor.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, std::time::Duration::from_secs(5))
    }

    /// Opens the supervisor's ledger: a file that is not a database or
    /// fails its integrity check is moved aside and a new one started; a
    /// file from a newer drover is refused and left as it is.
    pub fn open_for_supervisor(path: &Path) -> std::result::Result<(Self, OpenNotes), OpenError> {
        let mut notes = OpenNotes {
            was_empty: std::fs::metadata(path).is_ok_and(|m| m.len() == 0),
            ..OpenNotes::default()
        };
        // A planted symlink is refused (with that reason) before anything
        // opens the file; a missing ledger is made 0600 from birth.
        crate::os::fsutil::create_private(path).map_err(other)?;
        match Self::inspect(path) {
            Ok(version) if version > SCHEMA_VERSION => {
                return Err(OpenError::Newer { path: path.to_path_buf(), found: version });
            }
            Ok(_) => {}
            Err(Inspected::Unreadable(e)) => {
                return Err(other(format!("cannot read {}: {e}", path.display())));
            }
            Err(Inspected::Damaged(why)) => {
                let moved = Self::move_aside(path).map_err(|e| {
                    other(format!("{} is damaged ({why}) and cannot be moved aside: {e}", path.display()))
                })?;
                notes.moved_aside = Some((moved, why));
            }
        }
        // At start-up nothing is supervised yet: a lock held a moment by
        // another process is waited for; afterwards the wait is short.
        let ledger = Self::open_with(path, std::time::Duration::from_secs(2)).map_err(|e| match e {
            rusqlite::Error::InvalidParameterName(m) => OpenError::Other(m),
            e => other(format!("cannot open {}: {e}", path.display())),
        })?;
        ledger.conn.busy_timeout(SUPERVISOR_BUSY_TIMEOUT).map_err(other)?;
        Ok((ledger, notes))
    }

    /// The schema version of an existing file (0 for none or a new one),
    /// or why it is damaged or cannot be read. Reads only.
    fn inspect(path: &Path) -> std::result::Result<i64, Inspected> {
        if !std::fs::metadata(path).is_ok_and(|m| m.len() > 0) {
            return Ok(0);
        }
        // Only what SQLite calls damage moves a file aside; a file that
        // cannot be read (permissions, a lock) is left where it is.
        let classify = |e: rusqlite::Error| match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt) => {
                Inspected::Damaged(e.to_string())
            }
            _ => Inspected::Unreadable(e.to_string()),
        };
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NOFOLLOW;
        let conn = Connection::open_with_flags(path, flags).map_err(classify)?;
        let _ = conn.busy_timeout(std::time::Duration::from_secs(2));
        let version = Self::version_of(&conn).map_err(classify)?;
        if version > SCHEMA_VERSION {
            return Ok(version);
        }
        let check: String = conn.query_row("PRAGMA quick_check(1)", [], |r| r.get(0)).map_err(classify)?;
        if check != "ok" {
            return Err(Inspected::Damaged(format!("integrity check: {check}")));
        }
        Ok(version)
    }

    /// `user_version`, or the version recorded in `meta` by older drovers.
    fn version_of(conn: &Connection) -> Result<i64> {
        let user: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if user != 0 {
            return Ok(user);
        }
        let has_meta: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta')",
            [],
            |r| r.get(0),
        )?;
        if !has_meta {
            return Ok(0);
        }
        Ok(conn
            .query_row("SELECT value FROM meta WHERE key = 'schema_version'", [], |r| r.get::<_, String>(0))
            .optional()?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    /// Renames a damaged ledger (and its -wal and -shm, so that SQLite can
    /// still open the copy) to `ledger.sqlite.corrupt-TIME`.
    fn move_aside(path: &Path) -> std::io::Result<PathBuf> {
        let stamp = humantime::format_rfc3339_seconds(SystemTime::now()).to_string().replace(':', "");
        let moved = with_suffix(path, &format!(".corrupt-{stamp}"));
        std::fs::rename(path, &moved)?;
        for s in ["-wal", "-shm"] {
            match std::fs::rename(with_suffix(path, s), with_suffix(&moved, s)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(moved)
    }

    fn open_with(path: &Path, busy: std::time::Duration) -> Result<Self> {
        // 0600 from birth; SQLite gives its -wal and -shm files the same mode.
        crate::os::fsutil::create_private(path).map_err(|e| {
            let code = rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN);
            rusqlite::Error::SqliteFailure(code, Some(e.to_string()))
        })?;

        let flags = OpenFlags::default() | OpenFlags::SQLITE_OPEN_NOFOLLOW;
        let conn = Connection::open_with_flags(path, flags)?;
        conn.busy_timeout(busy)?;
        // Refuse a newer file before anything is written to it.
        let version = Self::version_of(&conn)?;
        if version > SCHEMA_VERSION {
            return Err(rusqlite::Error::InvalidParameterName(
                OpenError::Newer { path: path.to_path_buf(), found: version }.to_string(),
            ));
        }

        // WAL: readers (`drover runs`) never block the supervisor; a crash
        // at any point leaves the last committed state. NORMAL sync is
        // enough against a crash of drover itself.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        // SQLite's page cache is 2 MiB by default, filled page by page as
        // runs come and go: a supervisor's memory creeping for hours. The
        // ledger's working set (the newest runs, their index pages) is
        // small, and a page read again comes from the OS's cache.
        conn.pragma_update(None, "cache_size", LEDGER_CACHE_KIB.saturating_neg())?;
        let mut ledger = Ledger { conn, path: path.to_path_buf(), wal_id: None };
        ledger.migrate(version)?;
        ledger.wal_id = file_id(&with_suffix(path, "-wal"));
        Ok(ledger)
    }

    /// How long SQLite waits for another connection's lock.
    pub fn set_busy_timeout(&self, d: std::time::Duration) -> Result<()> {
        self.conn.busy_timeout(d)
    }

    /// Opens the ledger read-only, for commands that only look.
    pub fn open_read_only(path: &Path) -> Result<Self> {
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Ledger { conn, path: path.to_path_buf(), wal_id: None })
    }

    /// Whether the WAL file this connection writes is still the one on
    /// disk. `None`: it is, or there is nothing to compare with yet.
    pub fn wal_replaced(&mut self) -> Option<String> {
        let wal = with_suffix(&self.path, "-wal");
        let now = file_id(&wal);
        match (self.wal_id, now) {
            (None, now) => {
                self.wal_id = now;
                None
            }
            (Some(a), Some(b)) if a == b => None,
            (Some(_), Some(_)) => Some(format!("{} was replaced by another file", wal.display())),
            (Some(_), None) => Some(format!("{} was deleted", wal.display())),
        }
    }

    /// After the WAL was deleted or replaced: this connection still holds
    /// the old one open, so a checkpoint copies what it holds into the
    /// database file; then the connection is opened anew, on a new WAL.
    pub fn recover_wal(&mut self) -> std::result::Result<(), String> {
        let checkpoint: Result<(i64, i64, i64)> =
            self.conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)));
        let fresh = Self::open_with(&self.path, SUPERVISOR_BUSY_TIMEOUT).map_err(|e| e.to_string())?;
        let old = std::mem::replace(self, fresh);
        drop(old);
        self.wal_id = file_id(&with_suffix(&self.path, "-wal"));
        match checkpoint {
            Ok((0, _, _)) => Ok(()),
            Ok((busy, _, _)) => Err(format!("the checkpoint was incomplete (busy = {busy})")),
            Err(e) => Err(format!("the checkpoint failed: {e}")),
        }
    }

    fn migrate(&self, version: i64) -> Result<()> {
        if version < 1 {
            self.conn.execute_batch(
                "BEGIN;
                 CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                 CREATE TABLE runs (
                   id INTEGER PRIMARY KEY AUTOINCREMENT,
                   job TEXT,
                   kind TEXT NOT NULL CHECK (kind IN ('job', 'flow', 'session')),
                   source TEXT NOT NULL,
                   state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'waiting', 'succeeded', 'failed', 'cancelled')),
                   created_at TEXT NOT NULL,
                   started_at TEXT,
                   ended_at TEXT,
                   exit_code INTEGER,
                   signal TEXT,
                   error TEXT,
                   owner_pid INTEGER,
                   owner_start INTEGER,
                   parent INTEGER REFERENCES runs(id) ON DELETE SET NULL,
                   name TEXT,
                   command TEXT NOT NULL DEFAULT '[]',
                   step INTEGER,
                   pid INTEGER,
                   pgid INTEGER,
                   pid_start INTEGER,
                   log TEXT
                 );
                 CREATE INDEX runs_by_job ON runs (job, state, id);
                 CREATE INDEX runs_by_state ON runs (state);
                 CREATE TABLE steps (
                   run INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
                   idx INTEGER NOT NULL,
                   name TEXT NOT NULL,
                   state TEXT NOT NULL,
                   started_at TEXT,
                   ended_at TEXT,
                   exit_code INTEGER,
                   signal TEXT,
                   error TEXT,
                   PRIMARY KEY (run, idx)
                 );
                 CREATE TABLE schedule (
                   job TEXT PRIMARY KEY,
                   last_tick TEXT,
                   skips INTEGER NOT NULL DEFAULT 0
                 );
                 INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', '1');
                 PRAGMA user_version = 1;
                 COMMIT;",
            )?;
        } else if self.conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? == 0 {
            // Written by a drover that kept the version in `meta` only.
            self.conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        Ok(())
    }

    /// Records a new queued run and returns its id.
    pub fn create(&mut self, new: &NewRun) -> Result<i64> {
        let tx = self.conn.transaction()?;
        tx.prepare_cached(
            "INSERT INTO runs (job, kind, source, state, created_at, parent, name, command, step)
             VALUES (?1, ?2, ?3, 'queued', ?4, ?5, ?6, ?7, ?8)",
        )?
        .execute(params![
            new.job,
            new.kind.as_str(),
            new.source.as_str(),
            now(),
            new.parent,
            new.name,
            serde_json::to_string(new.command).expect("argv serializes"),
            (new.kind == Kind::Flow).then_some(new.first_step),
        ])?;
        let id = tx.last_insert_rowid();
        for (i, name) in new.steps.iter().enumerate() {
            // Steps before the first one to run were done by the parent.
            let state = if (i as u32) < new.first_step { "succeeded" } else { "queued" };
            tx.execute(
                "INSERT INTO steps (run, idx, name, state) VALUES (?1, ?2, ?3, ?4)",
                params![id, i as i64, name, state],
            )?;
        }
        tx.commit()?;
        Ok(id)
    }

    /// The one way a run changes state: from one of `from` to `to`. Returns
    /// whether it did; `false` means the run was in another state (or is
    /// gone), and nothing was written.
    fn transition(
        &self,
        id: i64,
        from: &[RunState],
        to: RunState,
        extra: &str,
        args: &[&dyn rusqlite::ToSql],
    ) -> Result<bool> {
        debug_assert!(from.iter().all(|s| !s.is_terminal()), "terminal states are terminal");
        let states: Vec<String> = from.iter().map(|s| format!("'{}'", s.as_str())).collect();
        let sql = format!(
            "UPDATE runs SET state = '{}'{extra} WHERE id = ?1 AND state IN ({})",
            to.as_str(),
            states.join(", ")
        );
        let mut all: Vec<&dyn rusqlite::ToSql> = vec![&id];
        all.extend_from_slice(args);
        // The same few statements over and over: parse each once.
        Ok(self.conn.prepare_cached(&sql)?.execute(all.as_slice())? == 1)
    }

    /// queued -> running, stamped with its owner. A process may be started
    /// for the run only after this returned `true` (it has committed).
    pub fn claim(&self, id: i64, owner: Owner) -> Result<bool> {
        self.transition(
            id,
            &[RunState::Queued],
            RunState::Running,
            ", started_at = ?2, owner_pid = ?3, owner_start = ?4",
            &[&now(), &owner.pid, &(owner.start_ticks as i64)],
        )
    }

    /// Records the process of a claimed run (for recovery after a crash).
    pub fn set_process(
        &self,
        id: i64,
        pid: i32,
        pgid: i32,
        pid_start: Option<u64>,
        log: &Path,
    ) -> Result<()> {
        self.conn
            .prepare_cached(
                "UPDATE runs SET pid = ?2, pgid = ?3, pid_start = ?4, log = ?5 WHERE id = ?1 AND state = 'running'",
            )?
            .execute(params![id, pid, pgid, pid_start.map(|t| t as i64), log.to_string_lossy()])?;
        Ok(())
    }

    /// Any active state -> a terminal one.
    pub fn finish(&self, id: i64, to: RunState, exit: Option<&Exit>, error: Option<&str>) -> Result<bool> {
        assert!(to.is_terminal(), "finish needs a terminal state");
        let t = now();
        let done = self.transition(
            id,
            RunState::ACTIVE,
            to,
            ", ended_at = ?2, exit_code = ?3, signal = ?4, error = ?5, pid = NULL",
            &[&t, &exit.and_then(|e| e.code), &exit.and_then(|e| e.signal.clone()), &error],
        )?;
        if done && to == RunState::Cancelled {
            // The steps it never reached will not run either.
            self.conn
                .prepare_cached(
                    "UPDATE steps SET state = 'cancelled', ended_at = ?2 WHERE run = ?1 AND state = 'queued'",
                )?
                .execute(params![id, t])?;
        }
        Ok(done)
    }

    /// running -> waiting: a flow reached an approval step.
    pub fn hold(&self, id: i64, step: u32) -> Result<bool> {
        self.transition(id, &[RunState::Running], RunState::Waiting, ", step = ?2, pid = NULL", &[&step])
    }

    /// waiting -> running: a held flow was approved.
    pub fn release(&self, id: i64, owner: Owner) -> Result<bool> {
        self.transition(
            id,
            &[RunState::Waiting],
            RunState::Running,
            ", owner_pid = ?2, owner_start = ?3",
            &[&owner.pid, &(owner.start_ticks as i64)],
        )
    }

    /// Records a flow's step: its start (`exit` None, `state` running) or end.
    pub fn step(
        &self,
        id: i64,
        index: u32,
        state: RunState,
        exit: Option<&Exit>,
        error: Option<&str>,
    ) -> Result<()> {
        let t = now();
        if state == RunState::Running {
            self.conn.execute(
                "UPDATE steps SET state = 'running', started_at = ?3 WHERE run = ?1 AND idx = ?2",
                params![id, index, t],
            )?;
            self.conn.execute("UPDATE runs SET step = ?2 WHERE id = ?1", params![id, index])?;
        } else {
            self.conn.execute(
                "UPDATE steps SET state = ?3, ended_at = ?4, exit_code = ?5, signal = ?6, error = ?7
                 WHERE run = ?1 AND idx = ?2",
                params![
                    id,
                    index,
                    state.as_str(),
                    t,
                    exit.and_then(|e| e.code),
                    exit.and_then(|e| e.signal.clone()),
                    error
                ],
            )?;
        }
        Ok(())
    }

    /// Ends whatever step of run `id` is still marked running (after a
    /// crash, nothing else will).
    pub fn fail_running_steps(&self, id: i64, error: &str) -> Result<()> {
        self.conn.execute(
            "UPDATE steps SET state = 'failed', ended_at = ?2, error = ?3 WHERE run = ?1 AND state = 'running'",
            params![id, now(), error],
        )?;
        Ok(())
    }

    pub fn get(&self, id: i64) -> Result<Option<Run>> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1");
        let run = self.conn.prepare_cached(&sql)?.query_row([id], row_to_run).optional()?;
        match run {
            Some(mut r) => {
                r.steps = self.steps_of(id)?;
                Ok(Some(r))
            }
            None => Ok(None),
        }
    }

    fn steps_of(&self, id: i64) -> Result<Vec<StepRecord>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT idx, name, state, started_at, ended_at, exit_code, signal, error FROM steps WHERE run = ?1 ORDER BY idx",
        )?;
        let rows = stmt.query_map([id], |r| {
            Ok(StepRecord {
                index: r.get(0)?,
                name: r.get(1)?,
                state: RunState::parse(&r.get::<_, String>(2)?).unwrap_or(RunState::Queued),
                started_at: r.get(3)?,
                ended_at: r.get(4)?,
                exit_code: r.get(5)?,
                signal: r.get(6)?,
                error: r.get(7)?,
            })
        })?;
        rows.collect()
    }

    /// Runs newest first, optionally of one job and/or in one state.
    pub fn list(&self, job: Option<&str>, state: Option<RunState>, limit: usize) -> Result<Vec<Run>> {
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE (?1 IS NULL OR job = ?1) AND (?2 IS NULL OR state = ?2)
             ORDER BY id DESC LIMIT ?3"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params![job, state.map(|s| s.as_str()), limit as i64], row_to_run)?;
        rows.collect()
    }

    /// Active (queued, running, waiting) runs, oldest first; flows with
    /// their steps (status names the step a flow is at).
    pub fn active(&self) -> Result<Vec<Run>> {
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE state IN ('queued', 'running', 'waiting') ORDER BY id"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let mut runs: Vec<Run> = stmt.query_map([], row_to_run)?.collect::<Result<_>>()?;
        for r in runs.iter_mut().filter(|r| r.kind == Kind::Flow) {
            r.steps = self.steps_of(r.id)?;
        }
        Ok(runs)
    }

    /// What to do about a run waiting for approval, or None.
    pub fn approval_hint(run: &Run) -> Option<String> {
        if run.state != RunState::Waiting {
            return None;
        }
        let step =
            run.step.and_then(|i| run.steps.get(i as usize)).map(|s| format!(" before step {}", s.name));
        Some(format!("waiting for approval{}: drover runs resume {}", step.unwrap_or_default(), run.id))
    }

    /// Deletes the terminal runs of `job` beyond the newest `retain` (never
    /// an active one) and returns the log files they had.
    pub fn prune(&mut self, job: Option<&str>, kind: Kind, retain: u32) -> Result<Vec<PathBuf>> {
        let tx = self.conn.transaction()?;
        let mut logs = Vec::new();
        {
            let mut stmt = tx.prepare_cached(
                "SELECT id, log FROM runs
                 WHERE job IS ?1 AND kind = ?2 AND state IN ('succeeded', 'failed', 'cancelled')
                 ORDER BY id DESC LIMIT -1 OFFSET ?3",
            )?;
            let doomed: Vec<(i64, Option<String>)> = stmt
                .query_map(params![job, kind.as_str(), retain], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_>>()?;
            for (id, log) in doomed {
                tx.execute(
                    "DELETE FROM runs WHERE id = ?1 AND state IN ('succeeded', 'failed', 'cancelled')",
                    [id],
                )?;
                logs.extend(log.map(PathBuf::from));
            }
        }
        tx.commit()?;
        Ok(logs)
    }

    /// The last schedule tick of `job` that was acted on.
    pub fn last_tick(&self, job: &str) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row("SELECT last_tick FROM schedule WHERE job = ?1", [job], |r| r.get(0))
            .optional()?
            .flatten())
    }

    pub fn set_last_tick(&self, job: &str, tick: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO schedule (job, last_tick) VALUES (?1, ?2)
             ON CONFLICT (job) DO UPDATE SET last_tick = excluded.last_tick",
            params![job, tick],
        )?;
        Ok(())
    }

    /// Counts a tick or trigger skipped because the job was at capacity.
    pub fn count_skip(&self, job: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO schedule (job, skips) VALUES (?1, 1)
             ON CONFLICT (job) DO UPDATE SET skips = skips + 1",
            params![job],
        )?;
        Ok(())
    }

    pub fn skips(&self, job: &str) -> Result<u64> {
        Ok(self
            .conn
            .query_row("SELECT skips FROM schedule WHERE job = ?1", [job], |r| r.get::<_, i64>(0))
            .optional()?
            .unwrap_or(0) as u64)
    }

    pub fn integrity_check(&self) -> Result<String> {
        self.conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))
    }
}

fn row_to_run(r: &rusqlite::Row) -> Result<Run> {
    let owner = match (r.get::<_, Option<i32>>(11)?, r.get::<_, Option<i64>>(12)?) {
        (Some(pid), Some(start)) => Some(Owner { pid, start_ticks: start as u64 }),
        _ => None,
    };
    Ok(Run {
        id: r.get(0)?,
        job: r.get(1)?,
        kind: Kind::parse(&r.get::<_, String>(2)?),
        source: Source::parse(&r.get::<_, String>(3)?),
        state: RunState::parse(&r.get::<_, String>(4)?).unwrap_or(RunState::Failed),
        created_at: r.get(5)?,
        started_at: r.get(6)?,
        ended_at: r.get(7)?,
        exit_code: r.get(8)?,
        signal: r.get(9)?,
        error: r.get(10)?,
        owner,
        parent: r.get(13)?,
        name: r.get(14)?,
        command: serde_json::from_str(&r.get::<_, String>(15)?).unwrap_or_default(),
        step: r.get(16)?,
        pid: r.get(17)?,
        pgid: r.get(18)?,
        pid_start: r.get::<_, Option<i64>>(19)?.map(|t| t as u64),
        log: r.get::<_, Option<String>>(20)?.map(PathBuf::from),
        steps: Vec::new(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn ledger() -> (tempfile::TempDir, Ledger) {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(&dir.path().join("ledger.sqlite")).unwrap();
        (dir, l)
    }

    const ME: Owner = Owner { pid: 1, start_ticks: 1 };

    /// Records a triggered run of job `name` running `true`.
    pub(crate) fn new_job(l: &mut Ledger, name: &str) -> Result<i64> {
        new_job_running(l, name, &["true".to_string()])
    }

    /// Records a triggered run of job `name` running `cmd`.
    fn new_job_running(l: &mut Ledger, name: &str, cmd: &[String]) -> Result<i64> {
        l.create(&NewRun {
            job: Some(name),
            kind: Kind::Job,
            source: Source::Trigger,
            parent: None,
            name: None,
            command: cmd,
            steps: &[],
            first_step: 0,
        })
    }

    fn job(l: &mut Ledger, name: &str) -> i64 {
        new_job(l, name).unwrap()
    }

    /// SQLite's own count of the memory it holds, in bytes.
    fn sqlite_memory() -> i64 {
        // SAFETY: a read of a process-wide counter.
        unsafe { rusqlite::ffi::sqlite3_memory_used() }
    }

    #[test]
    fn the_page_cache_stays_within_its_bound_however_many_runs_come_and_go() {
        let (_d, mut l) = ledger();
        assert_eq!(
            l.conn.query_row("PRAGMA cache_size", [], |r| r.get::<_, i64>(0)).unwrap(),
            -LEDGER_CACHE_KIB
        );
        // Enough runs, each with a long command, for a ledger of several
        // MiB: with the default cache, SQLite would hold 2 MiB of it.
        let cmd = vec!["x".repeat(2000)];
        for _ in 0..3000 {
            let id = new_job_running(&mut l, "j", &cmd).unwrap();
            assert!(l.finish(id, RunState::Cancelled, None, None).unwrap());
        }
        let _ = l.get(1).unwrap();
        let used = sqlite_memory();
        // Other tests' ledgers in this process count too; the bound is
        // what one default cache alone would pass.
        assert!(used < 1536 * 1024, "SQLite holds {used} bytes");
    }

    #[test]
    fn lifecycle_and_terminal_states_are_terminal() {
        let (_d, mut l) = ledger();
        let id = job(&mut l, "a");
        assert_eq!(l.get(id).unwrap().unwrap().state, RunState::Queued);
        assert!(l.claim(id, ME).unwrap());
        assert!(!l.claim(id, ME).unwrap(), "a run is claimed once");
        assert!(l.finish(id, RunState::Succeeded, Some(&Exit::code(0)), None).unwrap());
        for to in [RunState::Failed, RunState::Cancelled, RunState::Succeeded] {
            assert!(!l.finish(id, to, None, Some("late")).unwrap());
        }
        assert!(!l.claim(id, ME).unwrap());
        let r = l.get(id).unwrap().unwrap();
        assert_eq!((r.state, r.exit_code, r.error), (RunState::Succeeded, Some(0), None));
        assert!(r.started_at.is_some() && r.ended_at.is_some());
        assert_eq!(r.owner, Some(ME));
    }

    #[test]
    fn prune_keeps_active_runs_and_the_newest_terminal_ones() {
        let (_d, mut l) = ledger();
        let ids: Vec<i64> = (0..6).map(|_| job(&mut l, "a")).collect();
        for &id in &ids[..4] {
            l.claim(id, ME).unwrap();
            l.finish(id, RunState::Failed, None, None).unwrap();
        }
        l.prune(Some("a"), Kind::Job, 2).unwrap();
        let left: Vec<i64> = l.list(Some("a"), None, 100).unwrap().iter().map(|r| r.id).collect();
        assert_eq!(left, [ids[5], ids[4], ids[3], ids[2]]);
    }

    #[test]
    fn schedule_ticks_and_skips_persist() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.sqlite");
        {
            let l = Ledger::open(&p).unwrap();
            l.set_last_tick("a", "2026-01-01T00:00:00Z").unwrap();
            l.count_skip("a").unwrap();
            l.count_skip("a").unwrap();
        }
        let l = Ledger::open(&p).unwrap();
        assert_eq!(l.last_tick("a").unwrap().as_deref(), Some("2026-01-01T00:00:00Z"));
        assert_eq!(l.skips("a").unwrap(), 2);
        assert_eq!(l.integrity_check().unwrap(), "ok");
    }
}

#[cfg(test)]
mod properties {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Debug)]
    enum Op {
        Create,
        Claim(usize),
        Hold(usize),
        Release(usize),
        Finish(usize, u8),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            Just(Op::Create),
            (0..8usize).prop_map(Op::Claim),
            (0..8usize).prop_map(Op::Hold),
            (0..8usize).prop_map(Op::Release),
            (0..8usize, 0..3u8).prop_map(|(i, t)| Op::Finish(i, t)),
            Just(Op::Reopen),
        ]
    }

    proptest! {
        /// Random transitions, with the database closed and reopened (a
        /// restart) in between: the ledger agrees with a model of the
        /// state machine, and no run ever leaves a terminal state.
        #[test]
        fn the_ledger_follows_the_state_machine(ops in proptest::collection::vec(op(), 1..60)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("l.sqlite");
            let mut l = Ledger::open(&path).unwrap();
            let mut model: HashMap<i64, RunState> = HashMap::new();
            let mut ids: Vec<i64> = Vec::new();
            let owner = Owner { pid: 7, start_ticks: 7 };
            for op in ops {
                let pick = |i: usize| ids.get(i % ids.len().max(1)).copied();
                match op {
                    Op::Create => {
                        let cmd = vec!["x".to_string()];
                        let id = l.create(&NewRun { job: Some("j"), kind: Kind::Flow, source: Source::Trigger,
                            parent: None, name: None, command: &cmd, steps: &[], first_step: 0 }).unwrap();
                        model.insert(id, RunState::Queued);
                        ids.push(id);
                    }
                    Op::Claim(i) => if let Some(id) = pick(i) {
                        let ok = l.claim(id, owner).unwrap();
                        prop_assert_eq!(ok, model[&id] == RunState::Queued);
                        if ok { model.insert(id, RunState::Running); }
                    },
                    Op::Hold(i) => if let Some(id) = pick(i) {
                        let ok = l.hold(id, 1).unwrap();
                        prop_assert_eq!(ok, model[&id] == RunState::Running);
                        if ok { model.insert(id, RunState::Waiting); }
                    },
                    Op::Release(i) => if let Some(id) = pick(i) {
                        let ok = l.release(id, owner).unwrap();
                        prop_assert_eq!(ok, model[&id] == RunState::Waiting);
                        if ok { model.insert(id, RunState::Running); }
                    },
                    Op::Finish(i, t) => if let Some(id) = pick(i) {
                        let to = [RunState::Succeeded, RunState::Failed, RunState::Cancelled][t as usize];
                        let ok = l.finish(id, to, None, None).unwrap();
                        prop_assert_eq!(ok, !model[&id].is_terminal());
                        if ok { model.insert(id, to); }
                    },
                    Op::Reopen => {
                        drop(l);
                        l = Ledger::open(&path).unwrap();
                    }
                }
            }
            for (id, state) in &model {
                prop_assert_eq!(l.get(*id).unwrap().unwrap().state, *state);
            }
            prop_assert_eq!(l.integrity_check().unwrap(), "ok");
        }
    }
}
