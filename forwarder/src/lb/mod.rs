//! Origin load balancing: which of an app's origins take new connections and
//! flows (weights, health checks, drain), and the consistent table (Maglev) that
//! picks one among them — built here for both the XDP program (UDP, through the
//! `MAGLEV` map) and the TCP proxy.
//!
//! Who may be picked, in order of preference (the first group that is not empty):
//! 1. origins that are up, not drained, with a weight above 0;
//! 2. origins that are up, not drained, with weight 0 (backups), equally;
//! 3. fail open: every origin not drained with a weight above 0, up or not (a
//!    health check can be wrong; refusing everything cannot be right);
//! 4. every origin with a weight above 0.

pub mod health;
pub mod maglev;

use std::collections::BTreeSet;

use forwarder_common::maglev_table_size;

use crate::config::App;
use maglev::Member;

/// An origin of an app, by the app's id and the origin's label (`Origin::label`).
pub type OriginRef = (String, String);

/// Origins out of selection, and why.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Availability {
    /// Failing their health check.
    pub down: BTreeSet<OriginRef>,
    /// Taken out by `forwarder drain`.
    pub drained: BTreeSet<OriginRef>,
}

impl Availability {
    pub fn is_down(&self, app: &str, origin: &str) -> bool {
        self.down.contains(&(app.to_string(), origin.to_string()))
    }

    pub fn is_drained(&self, app: &str, origin: &str) -> bool {
        self.drained
            .contains(&(app.to_string(), origin.to_string()))
    }

    /// How many of `app`'s origins are up (not failing a health check).
    pub fn up_count(&self, app: &App) -> usize {
        app.origins
            .iter()
            .filter(|o| !self.is_down(&app.id, &o.label()))
            .count()
    }
}

/// The origins of `app` that new connections and flows go to, with their weights
/// (see the module docs for the order of preference).
pub fn members(app: &App, availability: &Availability) -> Vec<Member> {
    let state: Vec<(bool, bool, u32)> = app
        .origins
        .iter()
        .map(|o| {
            let label = o.label();
            (
                availability.is_down(&app.id, &label),
                availability.is_drained(&app.id, &label),
                o.weight,
            )
        })
        .collect();
    let groups: [&dyn Fn(bool, bool, u32) -> Option<u32>; 4] = [
        &|down, drained, w| (!down && !drained && w > 0).then_some(w),
        &|down, drained, w| (!down && !drained && w == 0).then_some(1),
        &|_, drained, w| (!drained && w > 0).then_some(w),
        &|_, _, w| (w > 0).then_some(w),
    ];
    for group in groups {
        let members: Vec<Member> = app
            .origins
            .iter()
            .zip(&state)
            .enumerate()
            .filter_map(|(offset, (origin, &(down, drained, w)))| {
                group(down, drained, w).map(|weight| Member {
                    offset: offset as u16,
                    identity: origin.label(),
                    weight,
                })
            })
            .collect();
        if !members.is_empty() {
            return members;
        }
    }
    Vec::new()
}

/// `app`'s origin table: `maglev_table_size` slots, each an offset among its
/// origins. Empty for an app with one origin.
pub fn table(app: &App, availability: &Availability) -> Vec<u16> {
    let size = maglev_table_size(app.origins.len() as u32);
    maglev::build(&members(app, availability), size)
}

/// How a TCP app picks origins for a new connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    table: Vec<u16>,
    /// Offsets of the origins that may be picked, in config order.
    members: Vec<u16>,
}

impl Selection {
    pub fn new(app: &App, availability: &Availability) -> Selection {
        Selection {
            table: table(app, availability),
            members: members(app, availability)
                .into_iter()
                .map(|m| m.offset)
                .collect(),
        }
    }

    /// The origin offsets to try, in order, for a client of hash `hash`: the
    /// table's pick, then the other members in config order after it.
    pub fn order(&self, hash: u64) -> Vec<usize> {
        let first = match self.table.len() {
            0 => self.members.first().copied(),
            n => Some(self.table[(hash % n as u64) as usize]),
        };
        let Some(first) = first else {
            return Vec::new();
        };
        let at = self.members.iter().position(|&m| m == first).unwrap_or(0);
        let mut order = vec![usize::from(first)];
        let n = self.members.len();
        order.extend(
            (1..n)
                .map(|k| usize::from(self.members[(at + k) % n]))
                .filter(|&o| o != usize::from(first)),
        );
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn app(origins: &str) -> App {
        let toml = format!(
            "[agent]\ninterfaces = [\"eth0\"]\n[[apps]]\nid = \"a\"\nprotocol = \"tcp/22\"\norigin_direct = {origins}\n"
        );
        Config::parse(&toml).expect("valid").apps.remove(0)
    }

    fn out(set: &[&str]) -> BTreeSet<OriginRef> {
        set.iter()
            .map(|o| ("a".to_string(), o.to_string()))
            .collect()
    }

    fn offsets(members: &[Member]) -> Vec<u16> {
        members.iter().map(|m| m.offset).collect()
    }

    const THREE: &str = r#"["tcp://10.0.0.1:22", { address = "tcp://10.0.0.2:22", weight = 0 }, { address = "tcp://10.0.0.3:22", weight = 3 }]"#;

    #[test]
    fn members_prefer_up_weighted_then_backups_then_fail_open() {
        let a = app(THREE);
        let mut av = Availability::default();
        let m = members(&a, &av);
        assert_eq!(offsets(&m), [0, 2]);
        assert_eq!(m[1].weight, 3);
        av.down = out(&["10.0.0.1:22", "10.0.0.3:22"]);
        assert_eq!(offsets(&members(&a, &av)), [1], "the weight-0 backup");
        av.down = out(&["10.0.0.1:22", "10.0.0.2:22", "10.0.0.3:22"]);
        assert_eq!(offsets(&members(&a, &av)), [0, 2], "all down: fail open");
        av.drained = out(&["10.0.0.1:22"]);
        assert_eq!(offsets(&members(&a, &av)), [2], "drained stays out");
    }

    #[test]
    fn the_table_leaves_out_down_and_drained_origins() {
        let a = app(r#"["tcp://10.0.0.1:22", "tcp://10.0.0.2:22", "tcp://10.0.0.3:22"]"#);
        let mut av = Availability::default();
        assert!(table(&a, &av).contains(&1));
        av.down = out(&["10.0.0.2:22"]);
        assert!(!table(&a, &av).contains(&1));
        av.down.clear();
        av.drained = out(&["10.0.0.3:22"]);
        let t = table(&a, &av);
        assert!(!t.contains(&2) && t.contains(&0) && t.contains(&1));
    }

    #[test]
    fn order_starts_at_the_table_pick_and_holds_every_member_once() {
        let a = app(r#"["tcp://10.0.0.1:22", "tcp://10.0.0.2:22", "tcp://10.0.0.3:22"]"#);
        let av = Availability {
            down: out(&["10.0.0.2:22"]),
            ..Availability::default()
        };
        let s = Selection::new(&a, &av);
        for hash in 0..200u64 {
            let order = s.order(hash);
            assert_eq!(order.len(), 2, "{order:?}");
            assert!(!order.contains(&1));
            assert_eq!(order[0], usize::from(s.table[(hash % 4093) as usize]));
        }
        let single = app(r#"["tcp://10.0.0.1:22"]"#);
        assert_eq!(Selection::new(&single, &av).order(7), [0]);
    }
}
