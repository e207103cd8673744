//! Which allocations are unmapped: rules on gfp flag names and migratetype, or a seeded fraction.
//!
//! All given rules must hold (they are ANDed); `--unmapped-fraction` then keeps a seeded,
//! deterministic fraction of the allocations the other rules selected (of all allocations when
//! it is the only rule). With no rule at all the default is `--unmapped GFP_KERNEL_ACCOUNT`:
//! memcg-accounted kernel allocations made on behalf of a user process (page tables, kernel
//! stacks, pipe and socket buffers, ...). They hold one process's data inside the kernel, which
//! is what secretmem/ASI-style isolation wants out of everyone else's reach; they are
//! unmovable order-0 pages scattered through memory, which is exactly the case where per-page
//! direct-map removal shatters huge mappings; and their migratetype (unmovable) is the one the
//! kernel series gives an unmapped free list (`UNMOVABLE|UNMAPPED`).

use serde::Serialize;
use thiserror::Error;

use crate::gfp::{direct_reclaim_bit, GfpMask, GfpTable};
use crate::trace::{Event, Trace, FLAG_ATOMIC, FLAG_UNMAPPED};

/// The default rule: `--unmapped GFP_KERNEL_ACCOUNT`.
pub const DEFAULT_UNMAPPED: &str = "GFP_KERNEL_ACCOUNT";

/// Classification rules as given on the command line.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rules {
    /// Unmapped if the flags contain all of these names (bitwise, see [`crate::gfp`]).
    pub all_of: Vec<String>,
    /// Unmapped if the flags contain any of these names.
    pub any_of: Vec<String>,
    /// Unmapped if the trace migratetype equals this.
    pub migratetype: Option<u8>,
    /// Keep this fraction (0..=1) of the otherwise selected allocations.
    pub fraction: Option<f64>,
    /// Seed for `fraction`.
    pub seed: u64,
}

/// Why the rules cannot be applied.
#[derive(Debug, Error, PartialEq)]
pub enum ClassifyError {
    /// A flag name neither the kernel table nor the trace knows.
    #[error("unknown GFP flag name {0:?} (use names as the kernel prints them, e.g. GFP_KERNEL_ACCOUNT, __GFP_ACCOUNT)")]
    UnknownName(String),
    /// Fraction outside 0..=1.
    #[error("--unmapped-fraction must be between 0 and 1, got {0}")]
    BadFraction(f64),
}

/// What classification decided.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Classification {
    /// The rules in words.
    pub rule: String,
    /// Allocations classified unmapped.
    pub unmapped_allocs: u64,
    /// Their pages.
    pub unmapped_pages: u64,
    /// Most unmapped pages live at once.
    pub peak_live_unmapped_pages: u64,
    /// Allocations whose context cannot sleep (no `__GFP_DIRECT_RECLAIM`).
    pub atomic_allocs: u64,
    /// Unmapped allocations per printed flag string, most frequent first.
    pub by_flags: Vec<(String, u64)>,
}

impl Rules {
    /// True when no rule is given (the default applies).
    pub fn is_empty(&self) -> bool {
        self.all_of.is_empty()
            && self.any_of.is_empty()
            && self.migratetype.is_none()
            && self.fraction.is_none()
    }

    /// The rules that apply: these, or the default when none is given.
    pub fn effective(&self) -> Rules {
        if self.is_empty() {
            Rules {
                all_of: vec![DEFAULT_UNMAPPED.to_string()],
                seed: self.seed,
                ..Rules::default()
            }
        } else {
            self.clone()
        }
    }

    /// The rules in words.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.all_of.is_empty() {
            parts.push(format!("gfp has all of {}", self.all_of.join("|")));
        }
        if !self.any_of.is_empty() {
            parts.push(format!("gfp has any of {}", self.any_of.join(",")));
        }
        if let Some(m) = self.migratetype {
            parts.push(format!("migratetype == {m}"));
        }
        if let Some(f) = self.fraction {
            parts.push(format!("seeded fraction {f} (seed {})", self.seed));
        }
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(" and ")
        }
    }
}

/// Rules resolved against a trace's flag table.
struct Resolved {
    all: Option<GfpMask>,
    any: Vec<GfpMask>,
    migratetype: Option<u8>,
    threshold: Option<u64>,
    seed: u64,
}

fn resolve(r: &Rules, table: &GfpTable) -> Result<Resolved, ClassifyError> {
    let mask_of = |n: &String| {
        table
            .lookup(n)
            .ok_or_else(|| ClassifyError::UnknownName(n.clone()))
    };
    let all = if r.all_of.is_empty() {
        None
    } else {
        Some(
            r.all_of
                .iter()
                .map(mask_of)
                .try_fold(0, |m, x| x.map(|x| m | x))?,
        )
    };
    let any = r
        .any_of
        .iter()
        .map(mask_of)
        .collect::<Result<Vec<_>, _>>()?;
    let threshold = match r.fraction {
        None => None,
        Some(f) if (0.0..=1.0).contains(&f) => Some(if f >= 1.0 {
            u64::MAX
        } else {
            (f * 2f64.powi(64)) as u64
        }),
        Some(f) => return Err(ClassifyError::BadFraction(f)),
    };
    Ok(Resolved {
        all,
        any,
        migratetype: r.migratetype,
        threshold,
        seed: r.seed,
    })
}

/// SplitMix64: a tiny, well-mixed, seedable hash for the fraction rule.
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl Resolved {
    fn unmapped(&self, id: u64, mask: GfpMask, mt: u8) -> bool {
        if let Some(all) = self.all {
            if mask & all != all {
                return false;
            }
        }
        if !self.any.is_empty() && !self.any.iter().any(|&m| m != 0 && mask & m == m) {
            return false;
        }
        if self.migratetype.is_some_and(|m| m != mt) {
            return false;
        }
        match self.threshold {
            None => true,
            Some(u64::MAX) => true,
            Some(t) => splitmix64(self.seed ^ splitmix64(id)) < t,
        }
    }
}

/// Set the unmapped/atomic flags on every event of `trace` (idempotent: re-classifying resets).
pub fn classify(trace: &mut Trace, rules: &Rules) -> Result<Classification, ClassifyError> {
    let rules = rules.effective();
    let res = resolve(&rules, &trace.gfp)?;
    let reclaim = direct_reclaim_bit();
    let mut flags_by_id: Vec<u8> = Vec::with_capacity(trace.stats.allocs as usize);
    let mut per_class = vec![0u64; trace.gfp.classes.len()];
    let (mut n, mut pages, mut live, mut peak, mut atomic) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let gfp_table = &trace.gfp;
    trace.events.set_all_flags(|ev| match ev {
        Event::Alloc {
            gfp,
            order,
            migratetype,
            ..
        } => {
            let id = flags_by_id.len() as u64;
            let mask = gfp_table.mask(gfp);
            let mut f = 0;
            if res.unmapped(id, mask, migratetype) {
                f |= FLAG_UNMAPPED;
                n += 1;
                pages += 1 << order;
                live += 1 << order;
                peak = peak.max(live);
                if let Some(c) = per_class.get_mut(gfp as usize) {
                    *c += 1;
                }
            }
            if mask & reclaim == 0 {
                f |= FLAG_ATOMIC;
                atomic += 1;
            }
            flags_by_id.push(f);
            f
        }
        Event::Free { alloc, order, .. } => {
            let f = flags_by_id.get(alloc as usize).copied().unwrap_or(0);
            if f & FLAG_UNMAPPED != 0 {
                live -= 1 << order;
            }
            f
        }
    });
    let mut by_flags: Vec<(String, u64)> = per_class
        .iter()
        .enumerate()
        .filter(|(_, &c)| c > 0)
        .map(|(i, &c)| (trace.gfp.classes[i].text.clone(), c))
        .collect();
    by_flags.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    Ok(Classification {
        rule: rules.describe(),
        unmapped_allocs: n,
        unmapped_pages: pages,
        peak_live_unmapped_pages: peak,
        atomic_allocs: atomic,
        by_flags,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{load, LoadOptions};

    const T: &str = "\
a-1 [000] ..... 1.0: mm_page_alloc: page=x pfn=0x100 order=0 migratetype=0 gfp_flags=GFP_KERNEL_ACCOUNT|__GFP_ZERO
a-1 [000] ..... 1.1: mm_page_alloc: page=x pfn=0x101 order=1 migratetype=1 gfp_flags=GFP_HIGHUSER_MOVABLE|__GFP_COMP
a-1 [000] ..... 1.2: mm_page_alloc: page=x pfn=0x104 order=0 migratetype=0 gfp_flags=GFP_HIGHUSER|__GFP_ACCOUNT
a-1 [000] ..... 1.3: mm_page_alloc: page=x pfn=0x105 order=0 migratetype=0 gfp_flags=GFP_NOWAIT
a-1 [000] ..... 1.4: mm_page_free: page=x pfn=0x100 order=0
";

    fn trace() -> Trace {
        load(T.as_bytes(), LoadOptions::default()).unwrap()
    }

    fn unmapped_ids(t: &Trace) -> Vec<u64> {
        t.events
            .iter()
            .filter_map(|e| match e {
                Event::Alloc { pfn, flags, .. } if flags & FLAG_UNMAPPED != 0 => Some(pfn),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn default_is_kernel_account_by_bits() {
        let mut t = trace();
        let c = classify(&mut t, &Rules::default()).unwrap();
        // Both the GFP_KERNEL_ACCOUNT line and GFP_HIGHUSER|__GFP_ACCOUNT carry its bits.
        assert_eq!(unmapped_ids(&t), vec![0x100, 0x104]);
        assert_eq!(c.unmapped_allocs, 2);
        assert_eq!(c.atomic_allocs, 1); // GFP_NOWAIT
        assert_eq!(c.peak_live_unmapped_pages, 2);
        // The free of 0x100 carries the flag too.
        assert!(
            matches!(t.events.get(4).unwrap(), Event::Free { alloc: 0, flags, .. } if flags & FLAG_UNMAPPED != 0)
        );
    }

    #[test]
    fn any_migratetype_and_errors() {
        let mut t = trace();
        let r = Rules {
            any_of: vec!["__GFP_MOVABLE".into(), "__GFP_ZERO".into()],
            ..Rules::default()
        };
        classify(&mut t, &r).unwrap();
        assert_eq!(unmapped_ids(&t), vec![0x100, 0x101]);
        let r = Rules {
            migratetype: Some(0),
            any_of: vec!["GFP_NOWAIT".into()],
            ..Rules::default()
        };
        classify(&mut t, &r).unwrap();
        // Only the GFP_NOWAIT line has __GFP_NOWARN and __GFP_KSWAPD_RECLAIM with migratetype 0.
        assert_eq!(unmapped_ids(&t), vec![0x105]);
        let bad = Rules {
            all_of: vec!["GFP_KERNL".into()],
            ..Rules::default()
        };
        assert_eq!(
            classify(&mut t, &bad),
            Err(ClassifyError::UnknownName("GFP_KERNL".into()))
        );
        let bad = Rules {
            fraction: Some(1.5),
            ..Rules::default()
        };
        assert_eq!(classify(&mut t, &bad), Err(ClassifyError::BadFraction(1.5)));
    }

    #[test]
    fn fraction_is_seeded_and_deterministic() {
        let mut lines = String::new();
        for i in 0..2000 {
            lines += &format!("a-1 [000] ..... 1.0: mm_page_alloc: page=x pfn={} order=0 migratetype=1 gfp_flags=GFP_KERNEL\n", 0x1000 + i);
        }
        let mut t = load(lines.as_bytes(), LoadOptions::default()).unwrap();
        let r = |seed| Rules {
            fraction: Some(0.25),
            seed,
            ..Rules::default()
        };
        let a = classify(&mut t, &r(1)).unwrap().unmapped_allocs;
        let a_ids = unmapped_ids(&t);
        let b = classify(&mut t, &r(1)).unwrap().unmapped_allocs;
        assert_eq!((a, a_ids.clone()), (b, unmapped_ids(&t)));
        assert!((400..600).contains(&a), "{a} of 2000 at 0.25");
        classify(&mut t, &r(2)).unwrap();
        assert_ne!(a_ids, unmapped_ids(&t), "another seed picks others");
        let all = Rules {
            fraction: Some(1.0),
            ..Rules::default()
        };
        assert_eq!(classify(&mut t, &all).unwrap().unmapped_allocs, 2000);
        let none = Rules {
            fraction: Some(0.0),
            ..Rules::default()
        };
        assert_eq!(classify(&mut t, &none).unwrap().unmapped_allocs, 0);
    }
}
