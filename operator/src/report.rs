//! `keyway-operator status --local DIR`: what the operator decided, read from
//! the state database (works whether or not the operator is running).

use std::path::Path;

use std::fmt::Write as _;

use anyhow::Result;

use keyway_state::{LeaseRow, Paths, rows};

fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let n = cells.len();
        for (i, (c, w)) in cells.into_iter().zip(&widths).enumerate() {
            if i + 1 == n {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  "));
            }
        }
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for row in rows {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

/// Whether an operator holds the directory's lock right now.
fn operator_running(paths: &Paths) -> bool {
    match std::fs::File::open(paths.lock()) {
        Ok(f) => f.try_lock_shared().is_err(),
        Err(_) => false,
    }
}

/// Prints the status of a local-mode directory.
pub fn print(dir: &Path, json: bool) -> Result<()> {
    let paths = Paths::new(dir);
    let Some(state) = keyway_state::read(&paths)? else {
        anyhow::bail!(
            "{} has no state yet; start the operator first: keyway-operator run --local {}",
            dir.display(),
            dir.display()
        );
    };
    let rows = rows(&state);
    let mut out = String::new();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
        return emit(&out);
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                format!("{}/{}", r.namespace, r.name),
                r.user.clone(),
                r.ip.clone().unwrap_or_else(|| "-".into()),
                r.phase.clone(),
                if r.routed { "yes" } else { "no" }.to_string(),
                r.ssh_command
                    .clone()
                    .or_else(|| r.message.clone())
                    .unwrap_or_default(),
            ]
        })
        .collect();
    write!(
        out,
        "{}",
        table(
            &[
                "NAMESPACE/NAME",
                "USER",
                "IP",
                "PHASE",
                "ROUTED",
                "SSH COMMAND"
            ],
            &cells
        )
    )?;
    let waiting: Vec<&LeaseRow> = rows
        .iter()
        .filter(|r| r.ssh_command.is_some() && r.message.is_some())
        .collect();
    for r in waiting {
        writeln!(
            out,
            "  note {}/{}: {}",
            r.namespace,
            r.name,
            r.message.as_deref().unwrap_or_default()
        )?;
    }
    if !state.pools.is_empty() {
        writeln!(out)?;
        let pools: Vec<Vec<String>> = state
            .pools
            .values()
            .map(|p| {
                let exhausted = p
                    .status
                    .conditions
                    .iter()
                    .find(|c| c.type_ == "Exhausted")
                    .map_or("-", |c| c.status.as_str());
                vec![
                    p.name.clone(),
                    p.status.capacity.clone().unwrap_or_else(|| "-".into()),
                    p.status.allocated.to_string(),
                    p.status.users.to_string(),
                    p.status.max_leases_per_user.to_string(),
                    exhausted.to_string(),
                ]
            })
            .collect();
        write!(
            out,
            "{}",
            table(
                &[
                    "POOL",
                    "CAPACITY",
                    "ALLOCATED",
                    "USERS",
                    "MAX/USER",
                    "EXHAUSTED"
                ],
                &pools
            )
        )?;
    }
    if !state.routes.is_empty() {
        writeln!(out)?;
        let routes: Vec<Vec<String>> = state
            .routes
            .values()
            .map(|r| {
                let accepted = r.status.conditions.iter().find(|c| c.type_ == "Accepted");
                vec![
                    format!("{}/{}", r.namespace, r.name),
                    r.spec.as_ref().map(|s| s.from.clone()).unwrap_or_default(),
                    accepted.map_or("-".into(), |c| c.status.clone()),
                    accepted.map(|c| c.message.clone()).unwrap_or_default(),
                ]
            })
            .collect();
        write!(
            out,
            "{}",
            table(&["ROUTE", "FROM", "ACCEPTED", "MESSAGE"], &routes)
        )?;
    }
    writeln!(out)?;
    let running = if operator_running(&paths) {
        "running"
    } else {
        "not running"
    };
    match &state.snapshot {
        Some(s) => {
            writeln!(
                out,
                "operator {running}; snapshot {} ({} leases, {} routes); subscribers: {}",
                s.version,
                s.leases,
                s.routes,
                if s.subscribers.is_empty() {
                    "none".to_string()
                } else {
                    s.subscribers
                        .iter()
                        .map(|x| {
                            format!(
                                "{} ({}, {}, acked {})",
                                x.node_id,
                                x.role,
                                if x.connected { "connected" } else { "gone" },
                                x.acked.as_deref().unwrap_or("nothing")
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            )?;
        }
        None => writeln!(out, "operator {running}; no snapshot published yet")?,
    }
    if !state.problems.is_empty() {
        writeln!(out, "\nproblems in {}:", dir.display())?;
        for p in &state.problems {
            writeln!(out, "  {p}")?;
        }
    }
    emit(&out)
}

/// Writes to stdout; a closed pipe (`status | head`) is not an error.
fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
