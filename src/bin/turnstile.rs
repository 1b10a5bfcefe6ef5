//! `turnstile`: administer a turnstile store, also while its owner runs, or
//! the shared limits of a PostgreSQL namespace.
//!
//! The verbs and flags follow `prefect global-concurrency-limit`. A thin shell
//! over [`turnstile::Admin`] (a store) and [`turnstile::Limiter`] (shared
//! limits): parsing, printing and exit codes live here, everything else in
//! the library.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use turnstile::{Admin, Error, LimitConfig, LimitInfo, LimitUpdate, Limiter};

/// Administer the limits of a turnstile store or of a PostgreSQL namespace.
#[derive(Debug, Parser)]
#[command(name = "turnstile", version)]
struct Cli {
    /// The store: an SQLite file, or a PostgreSQL URL (`postgres://...`) or
    /// connection string (`host=... dbname=...`) for shared limits.
    #[arg(long, env = "TURNSTILE_DB", global = true)]
    db: Option<String>,

    /// The namespace of shared limits on PostgreSQL (default `turnstile`).
    #[arg(long, env = "TURNSTILE_NAMESPACE", global = true)]
    namespace: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a limit (and the store, if there is none yet).
    Create {
        name: String,
        /// Capacity in slots; 0 pauses the limit.
        #[arg(long, allow_hyphen_values = true)]
        limit: u32,
        /// Rate-limit slots drained per second.
        #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
        slot_decay_per_second: f64,
        /// Create it inactive.
        #[arg(long)]
        disable: bool,
    },
    /// List every limit with its occupancy.
    Ls {
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Show every field of one limit.
    Inspect {
        name: String,
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Change a limit.
    Update {
        name: String,
        #[arg(long, allow_hyphen_values = true)]
        limit: Option<u32>,
        #[arg(long, allow_hyphen_values = true)]
        slot_decay_per_second: Option<f64>,
        #[arg(long, conflicts_with = "disable")]
        enable: bool,
        #[arg(long)]
        disable: bool,
    },
    /// Activate a limit.
    Enable { name: String },
    /// Deactivate a limit: acquisitions pass through it.
    Disable { name: String },
    /// Drop a limit's decaying slots and zero its denied count.
    Reset { name: String },
    /// Delete a limit (asks first on a terminal).
    Delete {
        name: String,
        /// Do not ask.
        #[arg(short, long)]
        yes: bool,
    },
    /// Redraw the `ls` table until interrupted.
    Watch {
        /// Seconds between redraws.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let message = e.to_string();
            let line = message.lines().next().unwrap_or("invalid arguments");
            eprintln!("{}", line.trim());
            return ExitCode::FAILURE;
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// What the verbs act on: a store file, or a namespace of shared limits.
enum Db {
    File(PathBuf),
    Shared {
        url: String,
        namespace: Option<String>,
    },
}

/// An open store or namespace.
enum Open {
    File(Admin),
    Shared(Limiter),
}

impl Db {
    fn parse(db: String, namespace: Option<String>) -> Result<Db, String> {
        let shared = db.starts_with("postgres://")
            || db.starts_with("postgresql://")
            || (db.contains('=') && !std::path::Path::new(&db).exists());
        if shared {
            return Ok(Db::Shared { url: db, namespace });
        }
        if namespace.is_some() {
            return Err("--namespace applies to PostgreSQL (--db postgres://...) only".into());
        }
        Ok(Db::File(PathBuf::from(db)))
    }

    /// Opens it; only `create` makes a store or namespace that is missing.
    fn open(&self, create: bool) -> Result<Open, Error> {
        match self {
            Db::File(path) if create => Admin::open_or_create(path).map(Open::File),
            Db::File(path) => Admin::open(path).map(Open::File),
            Db::Shared { url, namespace } => {
                let mut builder = Limiter::builder()
                    .postgres(url.clone())
                    .create_namespace(create);
                if let Some(ns) = namespace {
                    builder = builder.namespace(ns.clone());
                }
                builder.build().map(Open::Shared)
            }
        }
    }

    fn describe(&self) -> String {
        match self {
            Db::File(path) => path.display().to_string(),
            Db::Shared { namespace, .. } => {
                format!("namespace {}", namespace.as_deref().unwrap_or("turnstile"))
            }
        }
    }
}

impl Open {
    fn create_limit(&mut self, name: &str, config: LimitConfig) -> Result<LimitInfo, Error> {
        match self {
            Open::File(a) => a.create_limit(name, config),
            Open::Shared(l) => l.create_limit(name, config),
        }
    }

    fn update_limit(&mut self, name: &str, update: LimitUpdate) -> Result<LimitInfo, Error> {
        match self {
            Open::File(a) => a.update_limit(name, update),
            Open::Shared(l) => l.update_limit(name, update),
        }
    }

    fn delete_limit(&mut self, name: &str) -> Result<(), Error> {
        match self {
            Open::File(a) => a.delete_limit(name),
            Open::Shared(l) => l.delete_limit(name),
        }
    }

    fn reset_limit(&mut self, name: &str) -> Result<LimitInfo, Error> {
        match self {
            Open::File(a) => a.reset_limit(name),
            Open::Shared(l) => l.reset_limit(name),
        }
    }

    fn limit(&self, name: &str) -> Result<Option<LimitInfo>, Error> {
        match self {
            Open::File(a) => a.limit(name),
            Open::Shared(l) => l.try_limit(name),
        }
    }

    fn limits(&self) -> Result<Vec<LimitInfo>, Error> {
        match self {
            Open::File(a) => a.limits(),
            Open::Shared(l) => l.try_limits(),
        }
    }

    fn owner(&self) -> String {
        match self {
            Open::File(a) => match a.owner() {
                Some(pid) => format!("owned by process {pid}"),
                None => "no owner".to_string(),
            },
            Open::Shared(_) => "shared".to_string(),
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    let db = cli
        .db
        .ok_or("no store given: pass --db PATH (or postgres://...) or set TURNSTILE_DB")?;
    let db = Db::parse(db, cli.namespace)?;
    let text = |e: Error| e.to_string();
    let mut out = std::io::stdout().lock();
    match cli.command {
        Command::Create {
            name,
            limit,
            slot_decay_per_second,
            disable,
        } => {
            let config = LimitConfig::new(limit)
                .slot_decay_per_second(slot_decay_per_second)
                .active(!disable);
            // Judge the input before a store file can come into being.
            config.check(&name).map_err(text)?;
            let info = db
                .open(true)
                .and_then(|mut a| a.create_limit(&name, config))
                .map_err(text)?;
            writeln!(out, "Created limit {:?}.", info.name).map_err(io)?;
        }
        Command::Ls { output } => {
            let all = db.open(false).and_then(|a| a.limits()).map_err(text)?;
            match output {
                Format::Table => write!(out, "{}", table(&all)).map_err(io)?,
                Format::Json => writeln!(
                    out,
                    "{}",
                    serde_json::Value::from(all.iter().map(json).collect::<Vec<_>>())
                )
                .map_err(io)?,
            }
        }
        Command::Inspect { name, output } => {
            let info = db
                .open(false)
                .and_then(|a| a.limit(&name))
                .map_err(text)?
                .ok_or_else(|| text(Error::NotFound { name }))?;
            match output {
                Format::Table => write!(out, "{}", fields(&info)).map_err(io)?,
                Format::Json => writeln!(out, "{:#}", json(&info)).map_err(io)?,
            }
        }
        Command::Update {
            name,
            limit,
            slot_decay_per_second,
            enable,
            disable,
        } => {
            let mut update = LimitUpdate::new();
            if let Some(limit) = limit {
                update = update.limit(limit);
            }
            if let Some(rate) = slot_decay_per_second {
                update = update.slot_decay_per_second(rate);
            }
            if enable || disable {
                update = update.active(enable);
            }
            if update == LimitUpdate::new() {
                return Err("nothing to update: give --limit, --slot-decay-per-second, --enable or --disable".into());
            }
            updated(&db, &name, update, &mut out)?;
        }
        Command::Enable { name } => updated(&db, &name, LimitUpdate::new().active(true), &mut out)?,
        Command::Disable { name } => {
            updated(&db, &name, LimitUpdate::new().active(false), &mut out)?
        }
        Command::Reset { name } => {
            db.open(false)
                .and_then(|mut a| a.reset_limit(&name))
                .map_err(text)?;
            writeln!(out, "Reset limit {name:?}.").map_err(io)?;
        }
        Command::Delete { name, yes } => {
            let mut admin = db.open(false).map_err(text)?;
            admin
                .limit(&name)
                .map_err(text)?
                .ok_or_else(|| text(Error::NotFound { name: name.clone() }))?;
            if !yes
                && std::io::stdin().is_terminal()
                && !confirm(&format!("Delete limit {name:?}?"))?
            {
                writeln!(out, "Not deleted.").map_err(io)?;
                return Ok(());
            }
            admin.delete_limit(&name).map_err(text)?;
            writeln!(out, "Deleted limit {name:?}.").map_err(io)?;
        }
        Command::Watch { interval } => {
            let interval = Duration::try_from_secs_f64(interval)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    format!("invalid --interval {interval}: give a positive number of seconds")
                })?;
            let admin = db.open(false).map_err(text)?;
            loop {
                let all = admin.limits().map_err(text)?;
                let owner = admin.owner();
                // Clear the screen and home the cursor, then redraw.
                write!(
                    out,
                    "\x1b[2J\x1b[H{}  ({owner})\n\n{}",
                    db.describe(),
                    table(&all)
                )
                .map_err(io)?;
                out.flush().map_err(io)?;
                std::thread::sleep(interval);
            }
        }
    }
    Ok(())
}

fn updated(db: &Db, name: &str, update: LimitUpdate, out: &mut impl Write) -> Result<(), String> {
    db.open(false)
        .and_then(|mut a| a.update_limit(name, update))
        .map_err(|e| e.to_string())?;
    writeln!(out, "Updated limit {name:?}.").map_err(io)
}

fn io(e: std::io::Error) -> String {
    format!("cannot write output: {e}")
}

fn confirm(question: &str) -> Result<bool, String> {
    eprint!("{question} [y/N] ");
    let mut answer = String::new();
    std::io::stdin()
        .read_line(&mut answer)
        .map_err(|e| e.to_string())?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

/// The `ls` table: one aligned row per limit.
fn table(all: &[LimitInfo]) -> String {
    let header = [
        "NAME", "LIMIT", "ACTIVE", "SLOTS", "HELD", "DECAYING", "WAITERS", "DECAY/S", "DENIED",
    ];
    let rows: Vec<[String; 9]> = all
        .iter()
        .map(|i| {
            [
                i.name.escape_debug().to_string(),
                i.limit.to_string(),
                i.active.to_string(),
                i.active_slots.to_string(),
                i.held_slots.to_string(),
                i.active_slots.saturating_sub(i.held_slots).to_string(),
                i.waiters.to_string(),
                i.slot_decay_per_second.to_string(),
                i.denied_slots.to_string(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[&str]| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            // Names left-aligned, figures right-aligned.
            if i == 0 {
                s += &format!("{cell:<w$}");
            } else {
                s += &format!("  {cell:>w$}");
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut text = line(&header);
    for row in &rows {
        text += &line(&row.iter().map(String::as_str).collect::<Vec<_>>());
    }
    if rows.is_empty() {
        text += "(no limits)\n";
    }
    text
}

/// `inspect`: every field of `LimitInfo`, one per line.
fn fields(i: &LimitInfo) -> String {
    format!(
        "name:                       {}\n\
         limit:                      {}\n\
         active:                     {}\n\
         slot_decay_per_second:      {}\n\
         active_slots:               {}\n\
         held_slots:                 {}\n\
         denied_slots:               {}\n\
         waiters:                    {}\n\
         avg_slot_occupancy_seconds: {}\n",
        i.name.escape_debug(),
        i.limit,
        i.active,
        i.slot_decay_per_second,
        i.active_slots,
        i.held_slots,
        i.denied_slots,
        i.waiters,
        i.avg_slot_occupancy_seconds,
    )
}

/// `LimitInfo` as JSON, with its field names.
fn json(i: &LimitInfo) -> serde_json::Value {
    serde_json::json!({
        "name": i.name,
        "limit": i.limit,
        "active": i.active,
        "slot_decay_per_second": i.slot_decay_per_second,
        "active_slots": i.active_slots,
        "held_slots": i.held_slots,
        "denied_slots": i.denied_slots,
        "waiters": i.waiters,
        "avg_slot_occupancy_seconds": i.avg_slot_occupancy_seconds,
    })
}
