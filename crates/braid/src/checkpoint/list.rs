//! `braid checkpoints JOB.toml [--instance NAME]`: what checkpoints a job (or one of
//! its instances) has, and one in detail.

use std::fmt::Write;

use super::coordinator::{instance_prefix, open_store};
use super::store::{CheckpointStore, PrefixStore};
use super::{epochs, read_manifest, Manifest, SourceAt, INSTANCES};
use crate::config::Plan;

/// The listing of every checkpoint, newest first, or one checkpoint in detail.
pub fn describe(plan: &Plan, inspect: Option<u64>) -> anyhow::Result<String> {
    let Some(config) = &plan.checkpoint else {
        anyhow::bail!(
            "{}: the job has no [checkpoint] section, so it keeps no checkpoints",
            plan.file.display()
        );
    };
    let root = open_store(config)?;
    let instances = instance_names(root.as_ref())?;
    let store: Box<dyn CheckpointStore> = match plan.instance.as_deref() {
        Some(name) => Box::new(PrefixStore::new(root, &instance_prefix(Some(name)))),
        None => root,
    };
    let all = epochs(store.as_ref())?;
    let mut out = String::new();
    if let Some(epoch) = inspect {
        anyhow::ensure!(
            all.contains(&epoch),
            "no checkpoint {epoch} in {} (there are: {:?})",
            store.describe(),
            all
        );
        let manifest = read_manifest(store.as_ref(), epoch)?;
        write_detail(&mut out, &manifest)?;
        return Ok(out);
    }
    writeln!(
        out,
        "checkpoints of job `{}`{} in {}",
        plan.name,
        plan.instance
            .as_deref()
            .map_or(String::new(), |n| format!(", instance `{n}`")),
        store.describe()
    )?;
    if plan.instance.is_none() && !instances.is_empty() {
        writeln!(
            out,
            "  instances with checkpoints here: {} (`braid checkpoints JOB --instance NAME` lists one's)",
            instances.join(", ")
        )?;
    }
    if all.is_empty() {
        writeln!(out, "  none")?;
        return Ok(out);
    }
    writeln!(
        out,
        "  {:>6}  {:<24}  {:>16}  {:>10}  {:>6}  positions",
        "epoch", "taken (UTC)", "watermark", "state MiB", "files"
    )?;
    for epoch in all {
        match read_manifest(store.as_ref(), epoch) {
            Ok(m) => writeln!(
                out,
                "  {:>6}  {:<24}  {:>16}  {:>10.1}  {:>6}  {}",
                m.epoch,
                utc(m.created_unix_ms),
                watermark(&m),
                m.state_bytes() as f64 / 1_048_576.0,
                m.files().count(),
                positions(&m)
            )?,
            Err(e) => writeln!(out, "  {epoch:>6}  UNREADABLE: {e:#}")?,
        }
    }
    Ok(out)
}

/// The instances that keep checkpoints in the store (`instances/NAME/`), sorted.
fn instance_names(store: &dyn CheckpointStore) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = store
        .list(&format!("{INSTANCES}/"))?
        .iter()
        .filter_map(|path| {
            let rest = path.strip_prefix(&format!("{INSTANCES}/"))?;
            Some(rest.split('/').next()?.to_string())
        })
        .filter(|n| !n.is_empty())
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

fn write_detail(out: &mut String, m: &Manifest) -> anyhow::Result<()> {
    writeln!(out, "checkpoint {} of job `{}`", m.epoch, m.job)?;
    writeln!(out, "  taken        {}", utc(m.created_unix_ms))?;
    writeln!(out, "  join         {}", m.join)?;
    writeln!(out, "  watermark    {}", watermark(m))?;
    writeln!(
        out,
        "  state        {:.1} MiB in {} files",
        m.state_bytes() as f64 / 1_048_576.0,
        m.files().count()
    )?;
    for s in &m.reader.sources {
        writeln!(
            out,
            "  source `{}`: {}; read {}, late {}, dead {}",
            s.name,
            position(&s.at),
            s.counts.input,
            s.counts.late,
            s.counts.dead
        )?;
    }
    for shard in &m.units {
        writeln!(
            out,
            "  partition {} shard {}: image {} ({} bytes, xxh3 {}), {} segment files, {:.1} MiB",
            shard.partition,
            shard.shard,
            shard.image.name,
            shard.image.bytes,
            shard.image.xxh3,
            shard.segments.len(),
            shard.segments.iter().map(|s| s.file.bytes).sum::<u64>() as f64 / 1_048_576.0
        )?;
    }
    writeln!(out, "  output files it published: {}", m.pending.len())?;
    for p in &m.pending {
        writeln!(out, "    {}", p.done.display())?;
    }
    Ok(())
}

fn position(at: &SourceAt) -> String {
    match at {
        SourceAt::Files(p) if p.path.as_os_str() == "<end>" => "end of input".into(),
        SourceAt::Files(p) => format!("{} byte {} (line {})", p.path.display(), p.offset, p.line),
        SourceAt::Generator { lines } => format!("generator line {lines}"),
        SourceAt::Events { events } => format!("event {events}"),
        SourceAt::Kafka { topic, offsets, .. } => {
            let offsets: Vec<String> = offsets
                .iter()
                .enumerate()
                .map(|(p, o)| format!("[{p}]@{o}"))
                .collect();
            format!("{topic} {}", offsets.join(" "))
        }
    }
}

fn positions(m: &Manifest) -> String {
    m.reader
        .sources
        .iter()
        .map(|s| format!("{}: {}", s.name, position(&s.at)))
        .collect::<Vec<_>>()
        .join("; ")
}

fn watermark(m: &Manifest) -> String {
    match m.watermark_ms {
        None => "-inf".into(),
        Some(ms) if ms == i64::MAX => "+inf (done)".into(),
        Some(ms) => braid_io::format_rfc3339_ms(ms),
    }
}

fn utc(unix_ms: u64) -> String {
    braid_io::format_rfc3339_ms(unix_ms as i64)
}
