//! The text dump: tables for people.

use std::fmt::Write;

use allocator::MAX_ORDER;

use super::DumpData;

/// Bytes as a short human size ("4 KiB", "2 MiB", "1.5 GiB").
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Short name of a permission ("none", "read", "read_write").
pub(super) fn perm_name(p: crate::stage2::Perm) -> &'static str {
    match p {
        crate::stage2::Perm::None => "none",
        crate::stage2::Perm::Read => "read",
        crate::stage2::Perm::ReadWrite => "read_write",
    }
}

/// Renders the text dump.
pub fn render(d: &DumpData) -> String {
    let mut o = String::new();
    // Writing to a String cannot fail; the results are ignored below for that reason.
    let _ = write_all(&mut o, d);
    o
}

fn write_all(o: &mut String, d: &DumpData) -> std::fmt::Result {
    let t = &d.totals;
    writeln!(o, "=== Veil stage-2 dump (reason: {}) ===", d.reason)?;
    match &d.managed {
        Some(m) => writeln!(
            o,
            "RAM {} [{:#x}, {:#x})  reserved [0x0, {:#x})  managed pfn {:#x}..{:#x} ({} pages, {} free)",
            human(d.ram_size),
            0,
            d.ram_size,
            d.reserved_end,
            m.base_pfn,
            m.base_pfn + m.nr_pages,
            m.nr_pages,
            m.free_pages
        )?,
        None => writeln!(
            o,
            "RAM {} [{:#x}, {:#x})  reserved [0x0, {:#x})  no allocator (a foreign kernel: freetypes \
             are unmanaged)",
            human(d.ram_size),
            0,
            d.ram_size,
            d.reserved_end
        )?,
    }
    writeln!(
        o,
        "pages: {} reserved, {} mapped, {} locked, {} unmapped, {} sensitive; {} pageblocks; \
         {} memslots (stage-2 backend: {})",
        t.reserved_pages,
        t.mapped_pages,
        t.locked_pages,
        t.unmapped_pages,
        t.sensitive_pages,
        t.pageblocks,
        t.memslots,
        d.stage2_backend
    )?;
    writeln!(
        o,
        "ASI view: {} ({} sensitive ranges: absent from the restricted view, read-write in the \
         full one; a view switch toggles each)",
        d.asi_view.name(),
        t.sensitive_runs
    )?;

    writeln!(o, "\nGPA ranges")?;
    let ftw = d
        .ranges
        .iter()
        .map(|r| r.freetype.len())
        .max()
        .unwrap_or(8)
        .max(8);
    writeln!(
        o,
        "  {:<18}  {:<18}  {:<9}  {:<ftw$}  {:>5}  {:<18}  {:>9}  {:<10}  {:<10}",
        "start", "end", "state", "freetype", "slot", "host address", "pages", "restricted", "full"
    )?;
    for r in &d.ranges {
        let slot = r.slot.map_or("-".to_string(), |s| s.to_string());
        write!(
            o,
            "  {:#018x}  {:#018x}  {:<9}  {:<ftw$}  {:>5}  {:#018x}  {:>9}  {:<10}  {:<10}",
            r.start,
            r.end,
            r.state,
            r.freetype,
            slot,
            r.host_addr,
            r.pages,
            perm_name(r.restricted),
            perm_name(r.full)
        )?;
        match r.owner.as_deref() {
            Some(super::OWNER_SECRET) => {
                writeln!(o, "  secret (--secret: unreachable in both views)")?
            }
            Some(owner) => writeln!(o, "  {owner}")?,
            None => writeln!(o)?,
        }
    }

    writeln!(
        o,
        "\nMemslots ({} in use, peak {})",
        d.memslots.len(),
        d.stage2.peak_memslots
    )?;
    writeln!(
        o,
        "  {:>5}  {:<18}  {:<18}  {:>10}  {:<18}",
        "slot", "gpa", "end", "size", "host address"
    )?;
    for s in &d.memslots {
        writeln!(
            o,
            "  {:>5}  {:#018x}  {:#018x}  {:>10}  {:#018x}",
            s.slot,
            s.gpa,
            s.gpa + s.len,
            human(s.len),
            s.host_addr
        )?;
    }

    if let (Some(a), Some(rows)) = (&d.allocator, &d.free_by_freetype) {
        write_allocator(o, a, rows)?;
    }

    let c = &d.stage2;

    writeln!(o, "\nStage-2 engine")?;
    writeln!(
        o,
        "  calls: unmap {}, map {}, zero {}; pages unmapped {}, mapped {}, zeroed {}; rejected {}",
        c.unmap_calls,
        c.map_calls,
        c.zero_calls,
        c.pages_unmapped,
        c.pages_mapped,
        c.pages_zeroed,
        c.rejected_updates
    )?;
    writeln!(
        o,
        "  memslot updates {} (created {}, deleted {}); in use {}, peak {}",
        c.memslot_updates, c.slots_created, c.slots_deleted, c.memslots_in_use, c.peak_memslots
    )?;

    if let Some(m) = &d.mermap {
        write_mermap(o, m)?;
    }

    writeln!(o, "\nKVM statistics")?;
    match &d.kvm_stats {
        None => writeln!(o, "  (not available)")?,
        Some(stats) => {
            let w = stats.iter().map(|s| s.name.len()).max().unwrap_or(0);
            for s in stats {
                writeln!(o, "  {:<w$}  {:>12}", s.name, s.value)?;
            }
        }
    }
    Ok(())
}

fn write_allocator(
    o: &mut String,
    a: &allocator::Snapshot,
    rows: &[super::FreeRow],
) -> std::fmt::Result {
    writeln!(o, "\nAllocator")?;
    writeln!(
        o,
        "  managed {} pages, free {}; flips to unmapped {}, to mapped {} (pageblocks)",
        a.managed_pages, a.free_pages, a.flips_to_unmapped, a.flips_to_mapped
    )?;
    writeln!(
        o,
        "  stage-2 calls: unmap {}, map {}, zero {}; pages unmapped {}, mapped {}, zeroed {}",
        a.stage2_unmap_calls,
        a.stage2_map_calls,
        a.stage2_zero_calls,
        a.stage2_pages_unmapped,
        a.stage2_pages_mapped,
        a.pages_zeroed
    )?;
    writeln!(
        o,
        "  free pageblocks: mapped {}, unmapped {}; mixed pageblocks {}; fallbacks claim {}, steal {}; alloc failures {}",
        a.free_pageblocks_mapped,
        a.free_pageblocks_unmapped,
        a.mixed_pageblocks,
        a.fallbacks_claim,
        a.fallbacks_steal,
        a.alloc_failures
    )?;
    writeln!(
        o,
        "  free blocks per order x freetype (pages = blocks << order; cached = orders 0-3 caches; free pg = lists + cached):"
    )?;
    let ftw = rows
        .iter()
        .map(|r| r.freetype.len())
        .max()
        .unwrap_or(8)
        .max(8);
    write!(o, "  {:<ftw$}", "freetype")?;
    for order in 0..=MAX_ORDER {
        write!(o, " {order:>5}")?;
    }
    writeln!(
        o,
        " {:>7} {:>9} {:>9} {:>9}",
        "cached", "free pg", "allocs", "frees"
    )?;
    for (i, row) in rows.iter().enumerate() {
        write!(o, "  {:<ftw$}", row.freetype)?;
        for b in &row.blocks_per_order {
            write!(o, " {b:>5}")?;
        }
        let allocs: u64 = a
            .allocs
            .iter()
            .map(|per| per.get(i).copied().unwrap_or(0))
            .sum();
        let frees: u64 = a
            .frees
            .iter()
            .map(|per| per.get(i).copied().unwrap_or(0))
            .sum();
        writeln!(
            o,
            " {:>7} {:>9} {:>9} {:>9}",
            row.cached_pages, row.pages, allocs, frees
        )?;
    }
    Ok(())
}

fn write_mermap(o: &mut String, m: &super::MermapDump) -> std::fmt::Result {
    writeln!(
        o,
        "\nMermap windows ({} pages per vCPU from {:#x}, last one reserved; realised as {})",
        m.window_pages, m.base, m.backend
    )?;
    for w in &m.windows {
        let c = &w.counters;
        writeln!(
            o,
            "  vCPU {}: [{:#x}, {:#x}) next {}  gets {} puts {} busy {}  wraps {} flushes {} \
             ({} ops, last {})  free teardowns {}",
            w.vcpu,
            w.base,
            w.base + m.window_pages * 4096,
            w.next,
            c.gets,
            c.puts,
            c.busy,
            c.wraps,
            c.flushes,
            c.flush_ops,
            c.last_flush_ops,
            c.free_teardowns
        )?;
        for (what, list) in [("live", &w.live), ("stale", &w.stale)] {
            for s in list.iter() {
                writeln!(
                    o,
                    "    {what:<5} slot {:>2}+{:<2} {:#x} -> RAM {:#x}",
                    s.first,
                    s.pages,
                    w.base + s.first * 4096,
                    s.target
                )?;
            }
        }
    }
    Ok(())
}
